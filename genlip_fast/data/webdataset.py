"""Webdataset-format ``.tar`` shards: members ``<key>.<ext>`` grouped by key (``key.jpg`` + ``key.txt``).

Each shard written here gets a sidecar index ``<shard>.idx`` (JSON: sample count, and per sample its key and the
byte offset and size of every member), so a reader can start at any sample with one seek. Shards without an index
(written by other tools) are indexed by scanning their tar headers, which reads no member data.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

INDEX_SUFFIX = ".idx"
INDEX_FORMAT = "genlip-wds-index/1"
SHARD_ERRORS = (OSError, EOFError, tarfile.TarError)
"""What indexing or reading a file that is not a (complete) tar raises."""


def shard_error(e: BaseException) -> str:
    """Why a shard was skipped, for logs and manifests."""
    return f"not a readable tar ({type(e).__name__}: {e})"


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
    """``[(key, {ext: (data_offset, size)})]`` in tar order, from the tar headers only. A compressed tar is not a
    shard (its offsets would be those of the decompressed stream): it fails here as not a readable tar."""
    out: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, ext = split_member(m.name)
            if not out or out[-1][0] != k:
                out.append((k, {}))
            out[-1][1][ext] = (m.offset_data, m.size)
    return out


def write_index(path: str | os.PathLike) -> Path:
    """Scan ``path`` and write its ``.idx`` sidecar atomically; returns the sidecar's path."""
    path = Path(path)
    entries = scan_shard(path)
    idx = path.with_name(path.name + INDEX_SUFFIX)
    tmp = idx.with_name(idx.name + ".tmp")
    body = {"format": INDEX_FORMAT, "tar_bytes": path.stat().st_size, "num_samples": len(entries),
            "samples": [[k, {e: list(v) for e, v in f.items()}] for k, f in entries]}
    tmp.write_text(json.dumps(body, separators=(",", ":")))
    os.replace(tmp, idx)
    return idx


def load_index(path: str | os.PathLike) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The shard's sample index: from its ``.idx`` sidecar when present and matching the tar's size, else by
    scanning the tar headers."""
    path = Path(path)
    idx = path.with_name(path.name + INDEX_SUFFIX)
    if idx.is_file():
        try:
            body = json.loads(idx.read_text())
            if body.get("format") == INDEX_FORMAT and body.get("tar_bytes") == path.stat().st_size:
                return [(k, {e: (int(v[0]), int(v[1])) for e, v in f.items()}) for k, f in body["samples"]]
        except (ValueError, KeyError, TypeError):
            pass  # unreadable or foreign sidecar: fall back to the tar itself
    return scan_shard(path)


def read_members(f, members: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """Read one sample's members from an open shard file ``f`` (binary, seekable)."""
    out = {}
    for ext, (off, size) in members.items():
        f.seek(off)
        out[ext] = f.read(size)
    return out


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
