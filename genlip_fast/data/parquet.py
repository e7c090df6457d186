"""Parquet shards: one sample per row, read a row group at a time with pyarrow.

Layouts read as they are published:

* Hugging Face image datasets: an image column of structs ``{bytes, path}``; where ``bytes`` is null the image is
  read from ``path``, relative to the Parquet file's folder (remote folders too);
* img2dataset's ``parquet`` output: ``key``, ``jpg`` (binary; null where a download failed), ``txt``, metadata;
* any table with one binary column of encoded images (JPEG, PNG, WebP).

The image column is found by its type (binary, or a struct with a binary ``bytes`` field; by name among several:
``jpg``, ``jpeg``, ``png``, ``webp``, ``image``, ``img``) or named with ``data.image_column``. A table without
one is refused with what it holds instead: image URLs only (Recap-DataComp-1B's metadata, img2dataset's sidecar
``.parquet``: download the images with img2dataset first) or image paths (a listing: convert it with
``python -m genlip_fast.data.convert``).

Sample ``i`` of a file is its row ``i`` (row group ``g``, row ``r``), so a saved position means the same row on
resume. A read loads that row group once (every column), kept in a byte-bounded cache the stream's shards share,
so a random order within a file costs one row-group read per cache miss: files with small row groups read well
(img2dataset and Hugging Face ``datasets`` write 100 rows per group for images); a file of one huge row group is
better converted to tar shards. A row reaches the caption rules as ``{"<ext>": image bytes, "json": {column:
value, ...}}`` (every other column, as Python values), and a string column named ``txt`` also as the ``txt``
member, as in a tar.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .transforms import BadImage, image_ext
from .webdataset import ShardError

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")
"""Preferred image columns, in order, when a table has several binary ones."""
PATH_COLUMNS = ("image", "filepath", "file_name", "image_path", "img_path", "path")
URL_COLUMNS = ("url", "image_url", "img_url")
CACHE_BYTES = 256 << 20
"""Row groups kept per reader (all its Parquet shards together), in bytes of their Arrow columns."""


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) \
        or pa.types.is_binary_view(t)


def image_kind(t: pa.DataType) -> str | None:
    """``"binary"``, ``"struct"`` (``{bytes, path}``) or None for a column type."""
    if _is_binary(t):
        return "binary"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type):
        return "struct"
    return None


def find_image_column(schema: pa.Schema, where: str, name: str = "") -> tuple[str, str]:
    """``(column, kind)`` of the encoded images in a table of ``schema`` (``where`` names it in errors), or
    :class:`ShardError` saying what the table holds instead."""
    names = schema.names
    if name:
        if name not in names:
            raise ShardError(f"{where}: no column {name!r} (data.image_column); columns: {', '.join(names)}")
        kind = image_kind(schema.field(name).type)
        if kind is None:
            raise ShardError(f"{where}: column {name!r} holds {schema.field(name).type}, not encoded images "
                             "(binary, or structs {bytes, path})")
        return name, kind
    found = [(n, k) for n in names if (k := image_kind(schema.field(n).type))]
    if len(found) > 1:
        preferred = [f for f in found if f[0].lower() in IMAGE_COLUMNS]
        preferred.sort(key=lambda f: IMAGE_COLUMNS.index(f[0].lower()))
        if not preferred:
            raise ShardError(f"{where}: several columns could hold images ({', '.join(n for n, _ in found)}); "
                             "name one with data.image_column")
        found = preferred
    if found:
        return found[0]
    strings = [n for n in names if pa.types.is_string(schema.field(n).type)
               or pa.types.is_large_string(schema.field(n).type)]
    url = next((n for n in strings if n.lower() in URL_COLUMNS), None)
    if url:
        raise ShardError(f"{where} holds no images, only their URLs (column {url!r}; columns: {', '.join(names)}): "
                         f"download them first, e.g. `img2dataset --url_list {where} --input_format parquet "
                         f"--url_col {url} --output_format webdataset ...`, and train on the .tar shards it writes")
    path = next((n for n in strings if n.lower() in PATH_COLUMNS), None)
    if path:
        raise ShardError(f"{where} holds image paths (column {path!r}), not images: make shards of it with "
                         f"`python -m genlip_fast.data.convert {where} OUT --image-col {path}`")
    raise ShardError(f"{where} holds no images: no binary column or {{bytes, path}} struct column "
                     f"(columns: {', '.join(names)})")


class RowGroupCache:
    """Row groups read lately, keyed ``(path, group)``, at most ``max_bytes`` of Arrow data in all (LRU)."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self._tables: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.reads = 0
        """Row groups read from storage (cache misses)."""

    def get(self, key: tuple[str, int]) -> pa.Table | None:
        with self._lock:
            t = self._tables.get(key)
            if t is not None:
                self._tables.move_to_end(key)
            return t

    def put(self, key: tuple[str, int], table: pa.Table) -> None:
        with self._lock:
            self.reads += 1
            if key in self._tables:
                return
            self._tables[key] = table
            self._bytes += table.nbytes
            while self._bytes > self.max_bytes and len(self._tables) > 1:
                self._bytes -= self._tables.popitem(last=False)[1].nbytes


class ParquetShard:
    """A Parquet file as a shard: ``len()`` rows, ``key(i)`` (``"row i"``), ``fields(i)`` (thread-safe).

    ``fields`` raises :class:`~genlip_fast.data.transforms.BadImage` for a row without a usable image (null, a
    missing file behind ``path``, bytes of no image format) and ``OSError`` when its row group cannot be read.
    """

    def __init__(self, path: str, *, image_column: str = "", cache: RowGroupCache | None = None):
        self.path = path
        self.cache = cache if cache is not None else RowGroupCache()
        self._lock = threading.Lock()  # one file object: row groups are read one at a time
        try:
            if storage.is_remote(path):
                self._file = storage.open_input(path, block_size=1 << 20)
                self._pf = storage.retrying(path, lambda: pq.ParquetFile(self._file), "open")
            else:
                self._file = None
                self._pf = pq.ParquetFile(storage.local_path(path))
        except (pa.ArrowException, ValueError) as e:
            raise ShardError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        md = self._pf.metadata
        self.image_col, self.kind = find_image_column(self._pf.schema_arrow, path, image_column)
        self.starts = [0]
        for g in range(md.num_row_groups):
            self.starts.append(self.starts[-1] + md.row_group(g).num_rows)
        self.group_bytes = [md.row_group(g).total_byte_size for g in range(md.num_row_groups)]

    def __len__(self) -> int:
        return self.starts[-1]

    def key(self, i: int) -> str:
        return f"row {i}"

    def _group(self, g: int) -> pa.Table:
        t = self.cache.get((self.path, g))
        if t is None:
            with self._lock:
                t = self.cache.get((self.path, g))  # another thread may have read it meanwhile
                if t is None:
                    read = lambda: self._pf.read_row_group(g)  # noqa: E731
                    try:  # a remote read is retried on transient errors; a local file's failure is its content
                        t = storage.retrying(self.path, read, "read") if storage.is_remote(self.path) else read()
                    except (OSError, pa.ArrowException) as e:
                        raise OSError(f"row group {g}: {type(e).__name__}: {e}") from None
                    self.cache.put((self.path, g), t)
        return t

    def fields(self, i: int) -> dict[str, bytes | dict]:
        g = bisect.bisect_right(self.starts, i) - 1
        t = self._group(g)
        r = i - self.starts[g]
        row = {name: t.column(name)[r].as_py() for name in t.column_names}
        image = row.pop(self.image_col)
        data = where = None
        if self.kind == "struct" and image is not None:
            data, where = image.get("bytes"), image.get("path")
            if data is None and where:
                try:
                    data = storage.read_file(storage.join(storage.parent(self.path), where))
                except FileNotFoundError:
                    raise BadImage("missing image", f"column {self.image_col!r}: no bytes and no file {where!r} "
                                                    "beside the Parquet file") from None
        elif self.kind == "binary":
            data = image
        if data is None:
            raise BadImage("missing image", f"column {self.image_col!r} is null")
        ext = image_ext(data)
        if ext is None:
            raise BadImage("not an image", f"column {self.image_col!r} starts with {data[:8]!r}")
        out: dict[str, bytes | dict] = {ext: data, "json": row}
        if isinstance(row.get("txt"), str):
            out["txt"] = row["txt"].encode("utf-8")
        return out

    def close(self) -> None:
        self._pf.close()
        if self._file is not None:
            self._file.close()
