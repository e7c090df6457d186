"""Turn images with captions, as datasets publish them, into indexed webdataset shards.

::

    python -m genlip_fast.data.convert photos/ shards/ --prefix train --per-shard 1000
    python -m genlip_fast.data.convert list.csv shards/ --image-col path --caption-col caption
    python -m genlip_fast.data.convert train.tsv shards/                   # open_clip's filepath<TAB>title
    python -m genlip_fast.data.convert blip_laion_cc_sbu_558k.json shards/ --images LLaVA-Pretrain/images
    python -m genlip_fast.data.convert coco/annotations/captions_train2017.json shards/ --images coco/train2017
    python -m genlip_fast.data.convert list.parquet shards/               # image paths or image bytes

Inputs:

* a folder: every ``.jpg/.jpeg/.png/.webp`` under it (sorted), captioned by the ``.txt`` beside it with the same stem
  (or by ``--caption-field`` of a ``.json`` beside it: a text at that dotted path, as ``data.caption_field``);
* a table with one image and its caption per row: ``.csv`` / ``.tsv`` (a header row; ``--separator`` for any
  other), ``.jsonl``, a ``.json`` array of records (LLaVA's ``{id, image, conversations}``), or ``.parquet``
  (an image path column, or the images themselves: binary or ``{bytes, path}`` structs);
* COCO captions JSON (``{images: [{id, file_name}], annotations: [{image_id, caption}]}``): images joined to their
  captions, one sample per caption (``--captions all``) or the first one (``--captions first``).

Columns: ``--image-col`` / ``--caption-col``, or found among the usual names (``image``, ``filepath``,
``file_name``, ...; ``caption``, ``title``, ``text``, ..., then ``conversations``). A caption may be text, a list of
texts (one sample each with ``--captions all``, else the first) or a conversation ``[{from, value}, ...]`` (its
last assistant reply, as the loader's ``conv`` caption rule takes it). Relative image paths start at ``--images
DIR``, by default the list's own folder.

Each shard ``<prefix>-NNNNNN.tar`` holds ``key.<ext>`` + ``key.txt`` (+ ``key.json``: the source record, so nothing
of it is lost) and gets a ``.idx`` sidecar; the folder's ``genlip-manifest.json`` lists every shard's sample count.
Records the loader would skip (unreadable or truncated image, unsupported format, missing or empty caption) are
left out here already, counted by reason and logged with their file and row. The sources are only read; a folder
that already holds ``<prefix>-*.tar`` shards is refused rather than written over.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .captions import MissingCaption, RuleError, conversation_reply, parse_rule
from .manifest import shard_entry, update_manifest
from .reader import IMAGE_EXTS, SkipCounter
from .transforms import BadImage, image_ext, probe_image
from .webdataset import write_shard

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "filepath", "file_name", "image_path", "img_path", "img", "path", "jpg")
CAPTION_COLUMNS = ("caption", "title", "text", "re_caption", "txt", "captions", "conversations", "conversation")


class ConvertError(ValueError):
    """The source as a whole cannot be converted (one line, naming the file and what is wrong)."""


@dataclass
class Item:
    """One record of a source: where it is (file, and the row or image in it, for messages), its image (a path or
    the bytes), its captions, the record itself (kept as ``key.json``), or why it is left out."""

    file: str
    row: str
    image: Path | bytes | None = None
    captions: list[str] | None = None
    record: dict | None = None
    problem: BadImage | None = None


# -- captions ----------------------------------------------------------------------------------------------------
def captions_of(value, *, every: bool) -> list[str]:
    """The caption texts of a record's caption value: a text, a list of texts (all, or the first), or a conversation
    (the reply the loader's ``conv`` rule takes: :func:`~genlip_fast.data.captions.conversation_reply`);
    :class:`BadImage` naming what the value is otherwise."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        try:
            return [conversation_reply(value).text]
        except MissingCaption as e:
            raise BadImage(e.reason, e.detail) from None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value) if every else value[:1]
    if value is None:
        raise BadImage("missing caption")
    raise BadImage("caption is not text", f"{type(value).__name__}: {str(value)[:60]}")


def pick(columns, wanted: str, usual: tuple[str, ...], what: str, where: str) -> str:
    """The column named ``wanted``, or the first usual one present; :class:`ConvertError` listing the columns."""
    columns = list(columns)
    if wanted:
        if wanted not in columns:
            raise ConvertError(f"{where}: no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    found = next((c for c in usual if c in columns), None)
    if found is None:
        flag = "--image-col" if what == "image" else "--caption-col"
        raise ConvertError(f"{where}: no {what} column among the usual names ({', '.join(usual)}); name it with "
                           f"{flag} (columns: {', '.join(columns)})")
    return found


# -- sources -----------------------------------------------------------------------------------------------------
def list_folder(root: Path, caption_field: str = "") -> Iterator[Item]:
    """The images under ``root`` with the ``.txt`` beside each, or with ``caption_field`` of the ``.json`` beside
    each, read as the loader reads ``data.caption_field`` (the caption rule ``json:FIELD``; dotted paths too)."""
    member = "json" if caption_field else "txt"
    rule = _folder_rule(caption_field)
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower().lstrip(".") not in IMAGE_EXTS:
            continue
        side = p.with_suffix("." + member)
        try:
            caption, problem = [rule.caption({member: side.read_bytes()} if side.is_file() else {}).text], None
        except MissingCaption as e:
            caption, problem = None, BadImage(e.reason, e.detail)
        yield Item(str(root), str(p.relative_to(root)), p, caption, problem=problem)


def _folder_rule(caption_field: str):
    try:
        return parse_rule(f"json:{caption_field}" if caption_field else "txt")
    except RuleError as e:
        raise ConvertError(f"--caption-field {caption_field!r}: {e}") from None


def read_records(path: Path, separator: str | None) -> Iterator[tuple[str, dict | None]]:
    """``(row, record)`` of each row of a CSV / TSV / JSONL / JSON-array / Parquet table (``row`` names it:
    ``"line 3"``, ``"record 7"``, ``"row 12"``); a row that is not a record comes as ``(row, None)``."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield f"row {n}", row
                n += 1
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = None
                    yield f"line {n}", row if isinstance(row, dict) else None
    elif suffix == ".json":
        body = load_json(path)
        for n, row in enumerate(body):
            yield f"record {n}", row if isinstance(row, dict) else None
    else:
        sep = separator or ("\t" if suffix == ".tsv" else ",")
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f, delimiter=sep), 2):  # line 1 is the header
                yield f"line {n}", row


def load_json(path: Path):
    """A ``.json`` listing: a JSON array of records (LLaVA), or COCO captions (a dict)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if isinstance(body, list) or (isinstance(body, dict) and {"images", "annotations"} <= body.keys()):
        return body
    raise ConvertError(f"{path}: neither a JSON array of records (LLaVA's {{id, image, conversations}}) nor COCO "
                       f"captions ({{images, annotations}}); top-level keys: {', '.join(list(body)[:8])}"
                       if isinstance(body, dict) else f"{path}: a JSON {type(body).__name__}, not a list of records")


def list_table(path: Path, images: Path, *, image_col: str, caption_col: str, separator: str | None,
               every: bool) -> Iterator[Item]:
    """The rows of a table: image path (relative to ``images``) or bytes, captions, the row itself."""
    cols: tuple[str, str] | None = None
    stored = "path"  # how a row holds its image: a path, or the bytes ("binary", "struct" {bytes, path})
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .parquet import image_kind

        schema = pq.ParquetFile(path).schema_arrow
        ic = pick(schema.names, image_col, IMAGE_COLUMNS, "image", str(path))
        kind = image_kind(schema.field(ic).type)
        if kind is None and not pa.types.is_string(schema.field(ic).type):
            raise ConvertError(f"{path}: column {ic!r} holds {schema.field(ic).type}, neither image paths nor images")
        stored = kind or "path"
        cols = (ic, pick(schema.names, caption_col, CAPTION_COLUMNS, "caption", str(path)))
    for where, row in read_records(path, separator):
        if row is None:
            yield Item(str(path), where, problem=BadImage("not a record", "not a JSON object"))
            continue
        if cols is None:
            cols = (pick(row, image_col, IMAGE_COLUMNS, "image", str(path)),
                    pick(row, caption_col, CAPTION_COLUMNS, "caption", str(path)))
            log.info("%s: images from column %r, captions from %r", path, *cols)
        ic, cc = cols
        value = row.get(ic)
        try:
            if value is None or value == "":
                raise BadImage("missing image", f"no {ic!r}")
            caps = captions_of(row.get(cc), every=every)
        except BadImage as e:
            yield Item(str(path), where, problem=e)
            continue
        if stored == "struct":
            image = value.get("bytes") or (images / value["path"] if value.get("path") else None)
        elif stored == "binary":
            image = value
        else:
            image = images / str(value)  # an absolute path stays as it is
        record = {k: v for k, v in row.items() if k != ic or stored == "path"}
        yield Item(str(path), where, image, caps, record)


def list_coco(path: Path, images: Path, *, every: bool) -> Iterator[Item]:
    """COCO captions: each image with its captions (all, or the first), in the order of ``images``."""
    body = load_json(path)
    if isinstance(body, list):
        raise ConvertError(f"{path}: a JSON array, not COCO captions")
    by_image: dict = {}
    for a in body["annotations"]:
        if isinstance(a, dict) and "image_id" in a:
            by_image.setdefault(a["image_id"], []).append(a)
    for n, im in enumerate(body["images"]):
        if not isinstance(im, dict) or not im.get("file_name"):
            yield Item(str(path), f"image {n}", problem=BadImage("missing image", "no file_name"))
            continue
        where = f"image {im.get('id')!r} ({im['file_name']})"
        anns = by_image.get(im.get("id"), [])
        try:
            caps = captions_of([a.get("caption") for a in anns] if anns else None, every=every)
        except BadImage as e:
            yield Item(str(path), where, problem=e)
            continue
        kept = anns if every else anns[:1]
        for cap, ann in zip(caps, kept):
            yield Item(str(path), where, images / im["file_name"], [cap], {"image": im, "annotation": ann})


def sources(src: Path, *, images: Path | None, image_col: str, caption_col: str, caption_field: str,
            separator: str | None, every: bool) -> Iterator[Item]:
    if src.is_dir():
        return list_folder(src, caption_field)
    if not src.is_file():
        raise ConvertError(f"{src}: no such file or folder")
    root = images if images is not None else src.parent
    if src.suffix.lower() == ".json" and isinstance(load_json(src), dict):
        return list_coco(src, root, every=every)
    return list_table(src, root, image_col=image_col, caption_col=caption_col, separator=separator, every=every)


# -- writing -----------------------------------------------------------------------------------------------------
def convert(src: str | os.PathLike, out_dir: str | os.PathLike, *, prefix: str = "train", per_shard: int = 1000,
            image_col: str = "", caption_col: str = "", caption_field: str = "",
            images: str | os.PathLike | None = None, separator: str | None = None, captions: str = "all",
            check: bool = True) -> dict:
    """Write the shards; returns ``{"shards": [...], "samples": n, "skipped": {reason: n}}``. :class:`ConvertError`
    when the source cannot be read as a whole, or not one of its records is usable."""
    if captions not in ("all", "first"):
        raise ConvertError(f"--captions must be 'all' or 'first', got {captions!r}")
    if per_shard < 1:
        raise ConvertError(f"--per-shard must be at least 1, got {per_shard}")
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.is_dir() and any(out_dir.glob(f"{prefix}-*.tar")):
        raise ConvertError(f"{out_dir} already holds {prefix}-*.tar shards: choose another --prefix or folder "
                           "(shards are never written over)")
    items = sources(src, images=Path(images) if images is not None else None, image_col=image_col,
                    caption_col=caption_col, caption_field=caption_field, separator=separator,
                    every=captions == "all")
    skipped = SkipCounter()
    shards: list[str] = []
    entries: dict[str, dict] = {}
    batch: list[tuple[str, dict[str, bytes]]] = []
    n = 0

    def flush():
        path = out_dir / f"{prefix}-{len(shards):06d}.tar"
        entries[path.name] = shard_entry(path, write_shard(path, batch))
        shards.append(str(path))
        batch.clear()

    for item in items:
        try:
            if item.problem is not None:
                raise item.problem
            data, ext = image_bytes(item.image)
            if check:
                probe_image(data)
        except BadImage as e:
            skipped.skip(e.reason, item.file, item.row, e.detail)
            continue
        for caption in item.captions:
            if not caption.strip():
                skipped.skip("empty caption", item.file, item.row)
                continue
            fields = {ext: data, "txt": caption.strip().encode("utf-8")}
            if item.record is not None:
                fields["json"] = json.dumps(item.record, ensure_ascii=False, default=str).encode("utf-8")
            batch.append((f"{n:09d}", fields))
            n += 1
            if len(batch) == per_shard:
                flush()
    if batch:
        flush()
    if entries:
        update_manifest(out_dir, entries)
    if n == 0:
        why = ", ".join(f"{r}: {c}" for r, c in sorted(skipped.counts.items())) or "it holds none"
        raise ConvertError(f"{src}: no usable record ({why}; see the warnings above)")
    return {"shards": shards, "samples": n, "skipped": dict(sorted(skipped.counts.items()))}


def image_bytes(image: Path | bytes | None) -> tuple[bytes, str]:
    """``(bytes, member extension)`` of an item's image; :class:`BadImage` when it cannot be had."""
    if image is None:
        raise BadImage("missing image")
    if isinstance(image, bytes):
        ext = image_ext(image)
        if ext is None:
            raise BadImage("not an image", f"starts with {image[:8]!r}")
    else:
        ext = image.suffix.lower().lstrip(".")
        try:
            image = image.read_bytes()
        except OSError as e:
            raise BadImage("unreadable file", f"{e.strerror or e}: {e.filename or image}") from None
    ext = "jpg" if ext == "jpeg" else ext
    if ext not in IMAGE_EXTS:
        raise BadImage("unsupported format", ext)
    return image, ext


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m genlip_fast.data.convert", description=__doc__.split("\n\n")[0],
                                 epilog="See the module documentation for the inputs each form reads.")
    ap.add_argument("src", help="a folder of images + .txt captions, or a .csv / .tsv / .jsonl / .json / .parquet "
                                "list (COCO captions JSON included)")
    ap.add_argument("out_dir")
    ap.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    ap.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default: 1000)")
    ap.add_argument("--image-col", default="", help="list column / field with the image (default: the usual names)")
    ap.add_argument("--caption-col", default="", help="list column / field with the caption (default: the usual "
                                                      "names, then conversations)")
    ap.add_argument("--caption-field", default="", help="folder mode: take captions from this field of the .json "
                                                        "beside each image (a dotted path, as data.caption_field)")
    ap.add_argument("--images", default=None, help="folder where relative image paths start (default: the list's "
                                                   "own folder)")
    ap.add_argument("--separator", default=None, help="column separator of a delimited list (default: tab for "
                                                      ".tsv, comma otherwise)")
    ap.add_argument("--captions", default="all", choices=("all", "first"),
                    help="several captions per image (COCO, lists): one sample each (all) or the first only")
    ap.add_argument("--no-check", action="store_true", help="do not check image headers while converting")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        res = convert(a.src, a.out_dir, prefix=a.prefix, per_shard=a.per_shard, image_col=a.image_col,
                      caption_col=a.caption_col, caption_field=a.caption_field, images=a.images,
                      separator=a.separator, captions=a.captions, check=not a.no_check)
    except (ConvertError, ImportError, OSError) as e:  # OSError: the output folder cannot be written
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
