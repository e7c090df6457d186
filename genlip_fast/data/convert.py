"""Turn a folder of images with captions, or a CSV / JSONL list of them, into indexed webdataset shards.

::

    python -m genlip_fast.data.convert photos/ shards/ --prefix train --per-shard 1000
    python -m genlip_fast.data.convert list.csv shards/ --image-col path --caption-col caption
    python -m genlip_fast.data.convert list.jsonl shards/

* a folder: every ``.jpg/.jpeg/.png/.webp`` under it (sorted), captioned by the ``.txt`` beside it with the same stem
  (or by ``--caption-field`` of a ``.json`` beside it);
* a ``.csv`` (with a header row) or ``.jsonl``: one image path and one caption per row; relative paths are taken from
  the list's folder.

Each shard ``<prefix>-NNNNNN.tar`` holds ``key.<ext>`` + ``key.txt`` and gets a ``.idx`` sidecar; the folder's
``genlip-manifest.json`` lists every shard's sample count (read at start instead of the shards). Records the
loader would skip (unreadable or truncated image, unsupported format, missing or empty caption) are left out here
already, counted and listed by reason.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .manifest import shard_entry, update_manifest
from .reader import IMAGE_EXTS
from .transforms import BadImage, probe_image
from .webdataset import write_shard

log = logging.getLogger(__name__)


def list_folder(root: Path, caption_field: str = "") -> Iterator[tuple[Path, str | None]]:
    """``(image path, caption or None)`` for the images under ``root``."""
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower().lstrip(".") not in IMAGE_EXTS:
            continue
        caption = None
        if caption_field:
            j = p.with_suffix(".json")
            if j.is_file():
                try:
                    v = json.loads(j.read_text())
                    caption = v.get(caption_field) if isinstance(v, dict) else None
                except ValueError:
                    caption = None
        else:
            t = p.with_suffix(".txt")
            if t.is_file():
                caption = t.read_text(encoding="utf-8", errors="replace")
        yield p, caption


def list_rows(path: Path, image_col: str, caption_col: str) -> Iterator[tuple[Path, str | None]]:
    """``(image path, caption or None)`` for each row of a CSV (with header) or JSONL list."""
    base = path.parent
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    for row in rows:
        if image_col not in row:
            raise KeyError(f"{path}: a row has no {image_col!r} column (columns: {sorted(row)})")
        img = Path(str(row[image_col]))
        caption = row.get(caption_col)
        yield (img if img.is_absolute() else base / img), (str(caption) if caption is not None else None)


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, *, prefix: str = "train", per_shard: int = 1000,
            image_col: str = "image", caption_col: str = "caption", caption_field: str = "",
            check: bool = True) -> dict:
    """Write the shards; returns ``{"shards": [...], "samples": n, "skipped": {reason: n}}``."""
    src, out_dir = Path(src), Path(out_dir)
    items = list_folder(src, caption_field) if src.is_dir() else list_rows(src, image_col, caption_col)
    skipped: dict[str, int] = {}
    shards: list[str] = []
    entries: dict[str, dict] = {}
    batch: list[tuple[str, dict[str, bytes]]] = []
    n = 0

    def flush():
        path = out_dir / f"{prefix}-{len(shards):06d}.tar"
        entries[path.name] = shard_entry(path, write_shard(path, batch))
        shards.append(str(path))
        batch.clear()

    for img, caption in items:
        ext = img.suffix.lower().lstrip(".")
        ext = "jpg" if ext == "jpeg" else ext
        try:
            if caption is None or not caption.strip():
                raise BadImage("missing caption" if caption is None else "empty caption")
            try:
                data = img.read_bytes()
            except OSError as e:
                raise BadImage("unreadable file", str(e)) from None
            if ext not in IMAGE_EXTS:
                raise BadImage("unsupported format", ext)
            if check:
                probe_image(data)
        except BadImage as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            log.warning("leaving out %s: %s", img, e)
            continue
        batch.append((f"{n:09d}", {ext: data, "txt": caption.strip().encode("utf-8")}))
        n += 1
        if len(batch) == per_shard:
            flush()
    if batch:
        flush()
    if entries:
        update_manifest(out_dir, entries)
    return {"shards": shards, "samples": n, "skipped": skipped}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a folder of images + .txt captions, or a .csv / .jsonl list")
    ap.add_argument("out_dir")
    ap.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    ap.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default: 1000)")
    ap.add_argument("--image-col", default="image", help="list column / field with the image path")
    ap.add_argument("--caption-col", default="caption", help="list column / field with the caption")
    ap.add_argument("--caption-field", default="", help="folder mode: take captions from this field of key.json")
    ap.add_argument("--no-check", action="store_true", help="do not check image headers while converting")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = convert(a.src, a.out_dir, prefix=a.prefix, per_shard=a.per_shard, image_col=a.image_col,
                  caption_col=a.caption_col, caption_field=a.caption_field, check=not a.no_check)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
