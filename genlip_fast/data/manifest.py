"""One small file per shard folder with every shard's sample count, so a run starts without opening any shard.

``<folder>/genlip-manifest.json``::

    {"format": "genlip-shard-manifest/1",
     "shards": {"train-000000.tar": {"samples": 1000, "bytes": 73400320}, ...}}

``genlip_fast.data.convert`` and the shapes generator write it with their shards. For shards made by other tools::

    python -m genlip_fast.data.manifest /data/s1 [/data/s2 ...]     # reads each shard's index (or scans its tar)

A run reads only the manifests at start, for the dataset's size (shards and samples per epoch, logged); each shard's
own index is loaded when a stream reaches the shard. Without a manifest a run works the same and says how to write
one; only the logged dataset size is missing. A shard that cannot be read is listed with ``"samples": 0`` and its
``"error"``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from .webdataset import SHARD_ERRORS, load_index, shard_error

log = logging.getLogger(__name__)

MANIFEST_NAME = "genlip-manifest.json"
MANIFEST_FORMAT = "genlip-shard-manifest/1"


def manifest_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / MANIFEST_NAME


def read_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """``{shard file name: {"samples", "bytes"[, "error"]}}`` of ``folder``'s manifest; ``{}`` when there is none."""
    p = manifest_path(folder)
    try:
        body = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        log.warning("ignoring %s: not valid JSON (%s); rebuild it with python -m genlip_fast.data.manifest %s",
                    p, e, folder)
        return {}
    if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT or not isinstance(body.get("shards"), dict):
        log.warning("ignoring %s: not a %s file", p, MANIFEST_FORMAT)
        return {}
    return body["shards"]


def update_manifest(folder: str | os.PathLike, entries: dict[str, dict]) -> Path:
    """Add or replace ``entries`` (file name -> ``{"samples": n, "bytes": size}``) in ``folder``'s manifest, written
    atomically; other shards' entries are kept."""
    shards = read_manifest(folder)
    shards.update(entries)
    p = manifest_path(folder)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "shards": dict(sorted(shards.items()))}, indent=0))
    os.replace(tmp, p)
    return p


def shard_entry(path: str | os.PathLike, samples: int | None = None) -> dict:
    """A manifest entry for one shard; ``samples=None`` counts them from its index (or tar headers)."""
    path = Path(path)
    try:
        n = len(load_index(path)) if samples is None else int(samples)
    except SHARD_ERRORS as e:
        return {"samples": 0, "bytes": path.stat().st_size if path.is_file() else 0, "error": shard_error(e)}
    return {"samples": n, "bytes": path.stat().st_size}


def build_manifest(folder: str | os.PathLike) -> dict:
    """Write the manifest of every ``*.tar`` in ``folder``; returns ``{"shards", "samples", "bad": [names]}``."""
    folder = Path(folder)
    entries = {p.name: shard_entry(p) for p in sorted(folder.glob("*.tar"))}
    update_manifest(folder, entries)
    return {"shards": len(entries), "samples": sum(e["samples"] for e in entries.values()),
            "bad": [name for name, e in entries.items() if "error" in e]}


def dataset_size(shards: Iterable[str]) -> tuple[int, int, list[str]]:
    """``(samples listed, shards listed, folders without a manifest entry for some shard)`` from the manifests of
    the shards' folders (one file read per folder; no shard is opened)."""
    by_folder: dict[str, list[str]] = {}
    for s in shards:
        by_folder.setdefault(os.path.dirname(s) or ".", []).append(os.path.basename(s))
    samples = listed = 0
    missing = []
    for folder, names in by_folder.items():
        entries = read_manifest(folder)
        found = [entries[n] for n in names if n in entries]
        samples += sum(int(e.get("samples", 0)) for e in found)
        listed += len(found)
        if len(found) < len(names):
            missing.append(folder)
    return samples, listed, missing


def describe_dataset(shards: list[str]) -> str:
    """One log line: the dataset's size from its manifests, or how to write the missing ones."""
    samples, listed, missing = dataset_size(shards)
    if not missing:
        return f"data: {len(shards)} shards, {samples:,} samples per epoch (from {MANIFEST_NAME})"
    return (f"data: {len(shards)} shards ({listed} in a manifest, {samples:,} samples); no {MANIFEST_NAME} entry for "
            f"some shards in {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: nothing is needed to "
            f"train, but `python -m genlip_fast.data.manifest {' '.join(missing[:3])}` records the dataset's size")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="write genlip-manifest.json (per-shard sample counts) for shard folders")
    ap.add_argument("folders", nargs="+", help="folders of webdataset .tar shards")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for folder in a.folders:
        res = build_manifest(folder)
        print(f"{manifest_path(folder)}: {res['shards']} shards, {res['samples']:,} samples"
              + (f"; unreadable: {', '.join(res['bad'])}" if res["bad"] else ""))


if __name__ == "__main__":
    main()
