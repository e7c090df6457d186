"""Batch feature extraction for retrieval indexes and probes (``python -m genlip_fast.speak features``).

    python -m genlip_fast.speak features INPUT --checkpoint C --out DIR [--patches] [--layer -2] [--norm]

INPUT is a folder of images (searched recursively, in sorted order) or shards: webdataset tars or Parquet files,
local or remote, named by any spec the data pipeline reads (a glob, a folder holding shards, a brace range, a
comma-separated list). DIR receives, per output shard ``NNNNN`` (one per input shard; for a folder of images, one
per ``--shard-size`` images)::

    features-NNNNN.npy          (n_ok, d) pooled features: the mean of each image's patch features
    patches-NNNNN.safetensors   with --patches: "features" (P, d) every patch's features, the images' rows one after
                                another; "offsets" (n_ok + 1,) int64 row starts; "grids" (n_ok, 2) int64 patch grids
    meta-NNNNN.jsonl|.parquet   one row per input image, in input order: key, source, height, width, grid, row (its
                                row in the features, null when it failed) and error (null when it did not)

and ``features.json``, what was asked (checkpoint, input, layer, ...): a rerun into DIR must ask the same. Every
file of a shard is written under a temporary name and renamed when the shard is complete, the metadata last, so a
rerun skips finished shards and redoes an interrupted one. An image that cannot be decoded or resized gets a
metadata row with its error and no feature row. Features do not depend on ``--batch-size`` (each image attends
only to its own patches; to rounding).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.inputs import open_image
from ..data.reader import IMAGE_EXTS, OTHER_IMAGE_EXTS, open_shard
from ..data.specs import COMPRESSED_SUFFIXES, SHARD_SUFFIXES, expand_spec
from ..data.storage import is_remote
from ..data.webdataset import SHARD_ERRORS, shard_error
from .encoder import VisionEncoder

FORMAT = "genlip-features/1"
MANIFEST = "features.json"
FOLDER_EXTS = {f".{e}" for e in IMAGE_EXTS + OTHER_IMAGE_EXTS}
SHARD_ENDS = (*SHARD_SUFFIXES, *COMPRESSED_SUFFIXES)
OUT_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class Item:
    """One input image: where it is and how to read its bytes."""

    key: str
    source: str
    read: Callable[[], bytes]


@dataclass
class Part:
    """One output shard: its input items, opened when the shard is processed (``with part.open() as items``)."""

    index: int
    source: str
    open: Callable[[], AbstractContextManager[list[Item]]]


@contextmanager
def _shard_items(path: str) -> Iterator[list[Item]]:
    """The images of one shard, read as the data pipeline reads it (:func:`~genlip_fast.data.reader.open_shard`: a
    webdataset tar or a Parquet file, local or remote); a shard that cannot be opened is one item whose reading
    fails, so its output shard records why and the run goes on."""
    try:
        shard = open_shard(path)
    except SHARD_ERRORS as e:
        def unreadable(reason=shard_error(e, path)) -> bytes:
            raise ValueError(reason)
        yield [Item("", path, unreadable)]
        return

    def reader(i: int) -> Callable[[], bytes]:
        def read() -> bytes:
            fields = shard.fields(i)
            ext = next((e for e in IMAGE_EXTS + OTHER_IMAGE_EXTS if e in fields), None)
            if ext is None:
                raise ValueError(f"no image member (fields {sorted(fields)})")
            return fields[ext]
        return read

    try:
        yield [Item(shard.key(i), path, reader(i)) for i in range(len(shard))]
    finally:
        shard.close()


def plan_parts(spec: str, shard_size: int) -> tuple[list[Part], dict]:
    """The output shards for INPUT and a description of the input for ``features.json``. A local folder holding no
    shard (``*.tar``, ``*.parquet``, compressed tars; searched recursively) is a folder of images (recursively,
    sorted by path, ``shard_size`` per output shard); anything else is a shard spec (one output shard per input
    shard)."""
    import xxhash

    root = Path(spec)
    if root.is_dir():
        files, shards_inside = [], False
        for p in root.rglob("*"):
            if p.name.lower().endswith(SHARD_ENDS):
                shards_inside = True
                break
            if p.suffix.lower() in FOLDER_EXTS and p.is_file():
                files.append(p.relative_to(root).as_posix())
        if not shards_inside:
            if not files:
                raise FileNotFoundError(f"{root}: no image files ({', '.join(sorted(FOLDER_EXTS))}) and no shards "
                                        f"({', '.join(SHARD_ENDS)})")
            files.sort()

            def shard(start: int) -> list[Item]:  # made when the shard is processed: memory holds paths, not items
                return [Item(f, f, (lambda f=f: (root / f).read_bytes())) for f in files[start:start + shard_size]]

            parts = [Part(i // shard_size, str(root), (lambda i=i: nullcontext(shard(i))))
                     for i in range(0, len(files), shard_size)]
            listing = xxhash.xxh64("\n".join(files).encode()).hexdigest()
            return parts, {"folder": str(root.resolve()), "images": len(files), "listing_xxh64": listing,
                           "shard_size": shard_size}
    shards = expand_spec(spec)
    return ([Part(i, s, (lambda s=s: _shard_items(s))) for i, s in enumerate(shards)],
            {"shards": [s if is_remote(s) else str(Path(s).resolve()) for s in shards]})


def write_patch_file(path: Path, rows: Iterator[np.ndarray], dim: int, dtype: type,
                     tail: Callable[[], dict[str, np.ndarray]]) -> None:
    """A safetensors file written as its rows come, so memory holds one batch, not the shard: room for the header
    is reserved first and filled in when the row count is known. Tensors: ``features (P, dim)`` in ``dtype`` from
    ``rows``, then the int64 arrays ``tail()`` gives once ``rows`` is exhausted."""
    reserve = 1024  # the header is ~300 bytes; safetensors reads space padding after the JSON
    with open(path, "wb") as f:
        f.write(b"\0" * (8 + reserve))
        n = 0
        for r in rows:
            f.write(np.ascontiguousarray(r, dtype=dtype).tobytes())
            n += r.shape[0]
        end = n * dim * np.dtype(dtype).itemsize
        header = {"features": {"dtype": {np.float32: "F32", np.float16: "F16"}[dtype], "shape": [n, dim],
                               "data_offsets": [0, end]}}
        for name, a in tail().items():
            a = np.ascontiguousarray(a, dtype="<i8")
            f.write(a.tobytes())
            header[name] = {"dtype": "I64", "shape": list(a.shape), "data_offsets": [end, end + a.nbytes]}
            end += a.nbytes
        text = json.dumps(header).encode()
        if len(text) > reserve:
            raise RuntimeError(f"safetensors header of {len(text)} bytes does not fit the {reserve} reserved")
        f.seek(0)
        f.write(struct.pack("<Q", reserve) + text.ljust(reserve, b" "))


def write_meta(path: Path, rows: list[dict], kind: str) -> None:
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        ("key", pa.string()), ("source", pa.string()), ("height", pa.int64()), ("width", pa.int64()),
        ("grid", pa.list_(pa.int64())), ("row", pa.int64()), ("error", pa.string())])), path)


def _decode(encoder: VisionEncoder, item: Item):
    """``(patches, grid, (h, w))`` of one input image, or why it failed (a string)."""
    from PIL import Image

    try:
        image = open_image(item.read(), name=item.key)
        patches, grid = encoder.transform(image)
        return patches, grid, (image.height, image.width)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"


@dataclass
class FeatureJob:
    """What ``features`` computes; stored in ``features.json``."""

    checkpoint: str
    """The checkpoint read (absolute; for a run folder, the checkpoint it resolved to)."""
    layer: int | None = None
    """Block whose output is pooled (negative from the end); None: the final-norm features."""
    norm: bool = False
    """Pass the block's output through the final norm (with ``layer``)."""
    patches: bool = False
    """Also write every patch's features."""
    out_dtype: str = "float32"
    """dtype of the feature files: float32 or float16."""
    meta: str = "jsonl"
    """Metadata format: jsonl or parquet."""
    image_size: int | str | None = None
    """The preprocessing size (``ImageTransform.sized``): None the checkpoint's own, N a square, "native"."""
    dtype: str = "fp32"
    """The dtype the encoder computes in (bf16 features differ from fp32 ones)."""


def extract(encoder: VisionEncoder, job: FeatureJob, spec: str, out_dir: str | Path, *, shard_size: int = 10000,
            batch_size: int = 64, workers: int = 4, progress: bool = True) -> dict:
    """Run ``job`` over INPUT ``spec`` into ``out_dir`` (module docstring). Returns counts: shards ``written`` and
    ``skipped`` (complete from an earlier run), images ``encoded`` and ``failed``."""
    from tqdm import tqdm

    if job.meta not in ("jsonl", "parquet"):
        raise ValueError(f"meta must be 'jsonl' or 'parquet', got {job.meta!r}")
    if job.meta == "parquet":
        import pyarrow  # noqa: F401 - fail before any work when it is missing
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}")
    out = Path(out_dir)
    parts, described = plan_parts(spec, shard_size)
    manifest = {"format": FORMAT, "input": described, **dataclasses.asdict(job), "dim": encoder.dim}
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text())
        diff = sorted(k for k in manifest.keys() | old.keys() if manifest.get(k) != old.get(k))
        if diff:
            raise ValueError(f"{out} holds features of another job ({', '.join(diff)} differ); choose another --out")
    else:
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    counts = {"written": 0, "skipped": 0, "encoded": 0, "failed": 0}
    with (ThreadPoolExecutor(max(1, workers)) as pool,
          tqdm(desc="features", unit="img", total=described.get("images"), disable=not progress) as bar):
        for part in parts:
            files = {"features": out / f"features-{part.index:05d}.npy",
                     "meta": out / f"meta-{part.index:05d}.{job.meta}"}
            if job.patches:
                files["patches"] = out / f"patches-{part.index:05d}.safetensors"
            if all(p.is_file() for p in files.values()):
                counts["skipped"] += 1
                continue
            with part.open() as items:
                done = _run_part(encoder, job, items, files, pool, batch_size, bar.update)
            counts["written"] += 1
            counts["encoded"] += done["encoded"]
            counts["failed"] += done["failed"]
    return counts


def _run_part(encoder: VisionEncoder, job: FeatureJob, items: list[Item], files: dict[str, Path],
              pool: ThreadPoolExecutor, batch_size: int, advance: Callable[[int], object]) -> dict:
    """Encode one output shard's images and write its files (temporary names, renamed at the end, meta last)."""
    layers = None if job.layer is None else [job.layer]
    dtype = OUT_DTYPES[job.out_dtype]
    tmp = {k: p.with_name(f".tmp-{p.name}") for k, p in files.items()}
    rows, pooled, offsets, grids = [], [], [0], []

    def patch_rows() -> Iterator[np.ndarray]:
        """Encodes batch after batch, filling rows / pooled / offsets / grids; yields each batch's patch features."""
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            decoded = list(pool.map(lambda it: _decode(encoder, it), chunk))
            good = [d for d in decoded if not isinstance(d, str)]
            if good:
                with torch.no_grad():
                    f = encoder.encode([d[0] for d in good], [d[1] for d in good], layers=layers, norm=job.norm)
                pooled.append((f.pooled if layers is None else f.pooled[0]).float().cpu().numpy())
            for it, d in zip(chunk, decoded):
                row = {"key": it.key, "source": it.source, "height": None, "width": None, "grid": None,
                       "row": None, "error": None}
                if isinstance(d, str):
                    row["error"] = d
                else:
                    row.update(height=d[2][0], width=d[2][1], grid=list(d[1]), row=len(grids))
                    grids.append(d[1])
                    offsets.append(offsets[-1] + d[1][0] * d[1][1])
                rows.append(row)
            advance(len(chunk))
            if good and job.patches:
                per_image = f.patches if layers is None else [t[0] for t in f.patches]
                yield torch.cat(per_image).float().cpu().numpy()

    if job.patches:
        write_patch_file(tmp["patches"], patch_rows(), encoder.dim, dtype,
                         lambda: {"offsets": np.asarray(offsets), "grids": np.asarray(grids).reshape(-1, 2)})
    else:
        for _ in patch_rows():
            pass
    feats = np.concatenate(pooled) if pooled else np.zeros((0, encoder.dim), np.float32)
    np.save(tmp["features"], feats.astype(dtype))
    write_meta(tmp["meta"], rows, job.meta)
    for k in ("patches", "features", "meta"):  # the metadata last: its presence marks the shard complete
        if k in tmp:
            os.replace(tmp[k], files[k])
    return {"encoded": len(grids), "failed": len(rows) - len(grids)}
