"""The manifest of a checkpoint: every file in it with its size and a fast checksum, checked before a resume.

``manifest.json`` (written last, just before the folder gets its final name)::

    {"format": 1, "algorithm": "xxh3_64",
     "files": {".metadata": {"size": 87217, "xxh3_64": "5c1f..."}, "__0_0.distcp": {...}, "meta.json": {...}, ...}}

xxh3_64 (the ``xxhash`` package) runs at tens of GB/s on one core, so checking a checkpoint costs about as much as
reading it; ``benchmarks/bench_checkpoint.py`` measures it against the save. It catches truncation, bit flips and
overwritten bytes; it is not a signature (anyone who can change the files can change the manifest too).
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

MANIFEST = "manifest.json"
ALGORITHM = "xxh3_64"


def _xxhash():
    try:
        import xxhash
    except ImportError:
        raise ImportError("checkpoint checksums need the xxhash package: pip install xxhash") from None
    return xxhash


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(size in bytes, xxh3_64 hex digest) of one file. The file is mapped, not read: right after a save its pages
    are in the page cache, and hashing them in place saves a copy."""
    h = _xxhash().xxh3_64()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
    return size, h.hexdigest()


def describe(folder: Path, names: list[str]) -> dict[str, dict]:
    """Manifest entries ``{name: {"size", "xxh3_64"}}`` of ``names`` (files in ``folder``)."""
    out = {}
    for name in names:
        size, digest = file_digest(folder / name)
        out[name] = {"size": size, ALGORITHM: digest}
    return out


def write_manifest(folder: Path, entries: dict[str, dict]) -> None:
    """Write ``folder/manifest.json`` and fsync it."""
    with open(folder / MANIFEST, "w") as f:
        json.dump({"format": 1, "algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(folder: Path) -> tuple[dict[str, dict] | None, str | None]:
    """``(entries, None)``, or ``(None, why)`` when the manifest is missing or unreadable."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, f"no {MANIFEST} (an incomplete copy, or written before checkpoints had manifests)"
    try:
        doc = json.loads(path.read_bytes())
        files = doc["files"]
        if doc.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            return None, f"{MANIFEST} has algorithm {doc.get('algorithm')!r}; this version reads {ALGORITHM!r}"
        for name, e in files.items():
            if "/" in name or name in ("", ".", "..") or not isinstance(e.get("size"), int) or ALGORITHM not in e:
                return None, f"{MANIFEST} has a malformed entry {name!r}"
        return files, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"


def check_files(folder: Path, entries: dict[str, dict]) -> list[str]:
    """What is wrong with the listed files (missing, another size, another checksum); empty when all match. Sizes
    are compared first, so a truncated file costs no read."""
    problems = []
    for name, e in entries.items():
        path = folder / name
        try:
            size = path.stat().st_size
            if size != e["size"]:
                problems.append(f"{name}: {size} bytes, the manifest says {e['size']} (truncated or overwritten)")
                continue
            _, digest = file_digest(path)
        except OSError as err:
            problems.append(f"{name}: cannot be read ({err.strerror or err})")
            continue
        if digest != e[ALGORITHM]:
            problems.append(f"{name}: checksum {digest} differs from the manifest's {e[ALGORITHM]} (damaged bytes)")
    return problems


__all__ = ["ALGORITHM", "MANIFEST", "check_files", "describe", "file_digest", "read_manifest", "write_manifest"]
