"""One small file per shard folder with every shard's sample count, so a run starts without opening any shard.

``<folder>/genlip-manifest.json``::

    {"format": "genlip-shard-manifest/1",
     "shards": {"train-000000.tar": {"samples": 1000, "bytes": 73400320}, ...}}

``genlip_fast.data.convert`` and the shapes generator write it with their shards. For shards made by other tools::

    python -m genlip_fast.data.manifest /data/s1 [/data/s2 ...]     # reads each shard's index (or scans its tar)
    python -m genlip_fast.data.manifest --index s3://bucket/s1        # also writes missing .idx sidecars

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
import sys
from collections.abc import Iterable

from . import storage
from .reader import open_shard
from .specs import NoShardsError, folder_shards
from .storage import StorageSetupError
from .webdataset import SHARD_ERRORS, read_sidecar, shard_error, write_index

log = logging.getLogger(__name__)

MANIFEST_NAME = "genlip-manifest.json"
MANIFEST_FORMAT = "genlip-shard-manifest/1"


def manifest_path(folder: str | os.PathLike) -> str:
    return storage.join(str(folder), MANIFEST_NAME)


def read_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """``{shard file name: {"samples", "bytes"[, "error"]}}`` of ``folder``'s manifest; ``{}`` when there is none."""
    p = manifest_path(folder)
    try:
        body = json.loads(storage.read_file(p))
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


def update_manifest(folder: str | os.PathLike, entries: dict[str, dict]) -> str:
    """Add or replace ``entries`` (file name -> ``{"samples": n, "bytes": size}``) in ``folder``'s manifest, written
    atomically (a remote folder's in one PUT); other shards' entries are kept."""
    shards = read_manifest(folder)
    shards.update(entries)
    p = manifest_path(folder)
    storage.write_file(p, json.dumps({"format": MANIFEST_FORMAT, "shards": dict(sorted(shards.items()))},
                                     indent=0).encode())
    return p


def shard_entry(path: str | os.PathLike, samples: int | None = None) -> dict:
    """A manifest entry for one shard (tar or Parquet); ``samples=None`` counts them from its index (or tar
    headers, or Parquet footer)."""
    path = str(path)
    try:
        if samples is None:
            shard = open_shard(path)
            samples = len(shard)
            shard.close()
        return {"samples": int(samples), "bytes": storage.size(path)}
    except SHARD_ERRORS as e:
        error = shard_error(e, path)
    return {"samples": 0, "bytes": storage.size(path) if storage.is_file(path) else 0, "error": error}


def build_manifest(folder: str | os.PathLike, *, index: bool = False) -> dict:
    """Write the manifest of every shard in ``folder`` (local or a URL: its ``*.tar`` and ``*.parquet`` files but
    img2dataset's metadata, as :func:`~genlip_fast.data.specs.folder_shards` takes them), and with ``index`` the
    ``.idx`` sidecar of every tar that lacks a valid one; returns ``{"shards", "samples", "bad": [names],
    "indexed": [names]}``."""
    folder = str(folder)
    paths = folder_shards(folder)
    if not paths:  # a mistyped folder: say so rather than write an empty manifest there (or fail to)
        raise NoShardsError(f"no shard in {folder!r} (.tar or .parquet files directly in it)")
    indexed = []
    if index:
        for p in paths:
            if p.endswith(".tar") and read_sidecar(p) is None:
                try:
                    write_index(p)
                    indexed.append(storage.name(p))
                except SHARD_ERRORS:
                    pass  # listed with its error below
    entries = {storage.name(p): shard_entry(p) for p in paths}
    update_manifest(folder, entries)
    return {"shards": len(entries), "samples": sum(e["samples"] for e in entries.values()),
            "bad": [name for name, e in entries.items() if "error" in e], "indexed": indexed}


def dataset_size(shards: Iterable[str]) -> tuple[int, int, list[str]]:
    """``(samples listed, shards listed, folders without a manifest entry for some shard)`` from the manifests of
    the shards' folders (one file read per folder; no shard is opened)."""
    by_folder: dict[str, list[str]] = {}
    for s in shards:
        by_folder.setdefault(storage.parent(s), []).append(storage.name(s))
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m genlip_fast.data.manifest",
                                 description="write genlip-manifest.json (per-shard sample counts) for shard folders")
    ap.add_argument("folders", nargs="+", help="folders of webdataset .tar or Parquet shards (local or URLs)")
    ap.add_argument("--index", action="store_true",
                    help="also write the .idx sidecar of every tar without a valid one (shards made by other tools)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for folder in a.folders:
        try:
            res = build_manifest(folder, index=a.index)
        except (OSError, StorageSetupError) as e:  # NoShardsError is a FileNotFoundError
            print(f"{ap.prog}: error: {e}", file=sys.stderr)
            return 2
        print(f"{manifest_path(folder)}: {res['shards']} shards, {res['samples']:,} samples"
              + (f"; {len(res['indexed'])} .idx sidecars written" if a.index else "")
              + (f"; unreadable: {', '.join(res['bad'])}" if res["bad"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
