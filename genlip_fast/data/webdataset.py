"""Webdataset-format ``.tar`` shards: members ``<key>.<ext>`` grouped by key (``key.jpg`` + ``key.txt``).

Each shard written here gets a sidecar index ``<shard>.idx`` (JSON: sample count, and per sample its key and the
byte offset and size of every member), so a reader can start at any sample with one seek. Shards without an index
(written by other tools) are indexed by scanning their tar headers, which reads no member data.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import storage

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".idx"
INDEX_FORMAT = "genlip-wds-index/1"


class ShardError(ValueError):
    """A file that is no usable shard, its message naming the file and why (e.g. a Parquet file without images);
    it is skipped like an unreadable tar."""


SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, ShardError)
"""What opening a file that is no (complete) shard raises."""


def shard_error(e: BaseException, path: str) -> str:
    """Why shard ``path`` (a tar or a Parquet file) was skipped, for logs and manifests."""
    if isinstance(e, ShardError):
        return str(e)
    kind = "Parquet file" if path.lower().endswith(".parquet") else "tar"
    return f"not a readable {kind} ({type(e).__name__}: {e})"


def split_member(name: str) -> tuple[str, str]:
    """``"dir/abc.seg.jpg"`` -> (``"dir/abc"``, ``"seg.jpg"``): the key ends at the first dot of the base name."""
    d, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return (f"{d}/{key}" if d else key), ext.lower()


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, dict[str, bytes]]], *,
                index: bool = True) -> int:
    """Write ``(key, {ext: bytes})`` samples to one tar atomically (a temp file renamed into place), and its
    ``.idx`` sidecar unless ``index=False``. Returns the sample count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tarfile.open(tmp, "w") as tar:
        for key, fields in samples:
            if "." in os.path.basename(key):
                raise ValueError(f"sample key {key!r} must not contain a dot (the extension starts at the first dot)")
            for ext, data in sorted(fields.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0  # reproducible bytes for the same samples
                tar.addfile(info, io.BytesIO(data))
            n += 1
    os.replace(tmp, path)
    if index:
        write_index(path)
    return n


def scan_shard(path: str | os.PathLike) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``[(key, {ext: (data_offset, size)})]`` in tar order, from the tar headers only (remotely: ranged reads of
    the headers, about one request per sample). A compressed tar is not a shard: its offsets would be those of the
    decompressed stream, so it fails here as not a readable tar."""
    path = str(path)

    def scan():
        out: list[tuple[str, dict[str, tuple[int, int]]]] = []
        with storage.open_input(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = split_member(m.name)
                if not out or out[-1][0] != k:
                    out.append((k, {}))
                out[-1][1][ext] = (m.offset_data, m.size)
        return out

    if storage.is_remote(path):
        log.warning("%s has no %s sidecar: indexing it reads every tar header over the network; "
                    "`python -m genlip_fast.data.manifest --index %s` writes the sidecars once", path, INDEX_SUFFIX,
                    storage.parent(path))
        return storage.retrying(path, scan, "index")
    return scan()


def write_index(path: str | os.PathLike) -> str:
    """Scan ``path`` and write its ``.idx`` sidecar (atomically; beside a remote shard too); returns its path."""
    path = str(path)
    entries = scan_shard(path)
    idx = path + INDEX_SUFFIX
    body = {"format": INDEX_FORMAT, "tar_bytes": storage.size(path), "num_samples": len(entries),
            "samples": [[k, {e: list(v) for e, v in f.items()}] for k, f in entries]}
    storage.write_file(idx, json.dumps(body, separators=(",", ":")).encode())
    return idx


def read_sidecar(path: str | os.PathLike) -> list[tuple[str, dict[str, tuple[int, int]]]] | None:
    """The index in ``path``'s ``.idx`` sidecar; None when there is none, or it is unreadable, foreign or does not
    match the tar's size."""
    path = str(path)
    try:
        body = json.loads(storage.read_file(path + INDEX_SUFFIX))
        if body.get("format") == INDEX_FORMAT and body.get("tar_bytes") == storage.size(path):
            return [(k, {e: (int(v[0]), int(v[1])) for e, v in f.items()}) for k, f in body["samples"]]
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError, AttributeError):
        pass  # unreadable or foreign sidecar: the tar itself is the truth
    return None


def load_index(path: str | os.PathLike) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The shard's sample index: from its ``.idx`` sidecar when present and matching the tar's size, else by
    scanning the tar headers."""
    found = read_sidecar(path)
    return found if found is not None else scan_shard(path)


def read_members(src, members: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """One sample's members from ``src`` (:func:`~genlip_fast.data.storage.open_source`): locally one read each;
    remotely one read spanning them all (a sample's members lie together in the tar: one ranged GET)."""
    if isinstance(src, storage.LocalSource):
        return {ext: src.read(off, size) for ext, (off, size) in members.items()}
    lo = min(off for off, _ in members.values())
    hi = max(off + size for off, size in members.values())
    span = src.read(lo, hi - lo)
    return {ext: span[off - lo:off - lo + size] for ext, (off, size) in members.items()}


class TarShard:
    """An indexed webdataset tar: ``len()`` samples, ``key(i)``, ``fields(i)`` -> ``{ext: bytes}`` (thread-safe)."""

    def __init__(self, path: str, index: list[tuple[str, dict[str, tuple[int, int]]]]):
        self.path, self.index = path, index
        self._src = storage.open_source(path)

    def __len__(self) -> int:
        return len(self.index)

    def key(self, i: int) -> str:
        return self.index[i][0]

    def fields(self, i: int) -> dict[str, bytes]:
        return read_members(self._src, self.index[i][1])

    def close(self) -> None:
        self._src.close()


def iter_shard(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for consecutive members sharing a key, in tar order."""
    key, fields = None, {}
    with tarfile.open(path, "r") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, ext = split_member(m.name)
            if k != key and key is not None:
                yield key, fields
                fields = {}
            key = k
            fields[ext] = tar.extractfile(m).read()
    if key is not None:
        yield key, fields
