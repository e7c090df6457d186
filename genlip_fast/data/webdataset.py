"""Webdataset-format ``.tar`` shards: members ``<key>.<ext>`` grouped by key (``key.jpg`` + ``key.txt``)."""

from __future__ import annotations

import glob
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def split_member(name: str) -> tuple[str, str]:
    """``"dir/abc.seg.jpg"`` -> (``"dir/abc"``, ``"seg.jpg"``): the key ends at the first dot of the base name."""
    d, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return (f"{d}/{key}" if d else key), ext.lower()


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write ``(key, {ext: bytes})`` samples to one tar atomically (a temp file renamed into place). Returns count."""
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
    return n


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


def expand_shards(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard paths from a path, a glob, a folder (its ``*.tar``), or a list of those; sorted, must be non-empty."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for s in specs:
        s = str(s)
        if os.path.isdir(s):
            out += sorted(glob.glob(os.path.join(s, "*.tar")))
        elif any(c in s for c in "*?["):
            out += sorted(glob.glob(s))
        elif os.path.isfile(s):
            out.append(s)
        else:
            raise FileNotFoundError(f"no shard at {s!r}")
    if not out:
        raise FileNotFoundError(f"no .tar shards matched {spec!r}")
    return out
