"""A small image–caption dataset generated offline with Pillow: coloured shapes and where they are.

Each image holds one or two shapes on a 3x3 layout; the caption names colour, shape and place, e.g.
"a red circle in the top left and a blue square in the bottom right." A tiny model can really learn it, so the demo
run shows a falling loss and readable generated captions in a few minutes on a CPU.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from .manifest import shard_entry, update_manifest
from .webdataset import write_shard

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (240, 220, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")


def place_name(r: int, c: int) -> str:
    if (r, c) == (1, 1):
        return "the center"
    if r == 1:
        return f"the middle {COLS[c]}"
    return f"the {ROWS[r]} {COLS[c]}" if c != 1 else f"the {ROWS[r]}"


WORDS = sorted(
    {w for col in COLORS for w in col.split()} | set(SHAPES) | {"a", "in", "and", "the", "."}
    | {w for r in range(3) for c in range(3) for w in place_name(r, c).split()}
)


def draw_shape(draw, shape: str, cx: float, cy: float, rad: float, fill: tuple[int, int, int]) -> None:
    """One filled shape of half-width ``rad`` centred at (cx, cy) on a ``PIL.ImageDraw``."""
    box = (cx - rad, cy - rad, cx + rad, cy + rad)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - rad), (cx - rad, cy + rad), (cx + rad, cy + rad)], fill=fill)
    else:
        t = rad * 0.35
        draw.rectangle((cx - rad, cy - t, cx + rad, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - rad, cx + t, cy + rad), fill=fill)


def render(rng: random.Random, size: int = 64):
    """One image (PIL, RGB, ``size x size``) and its caption."""
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(10, 60) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.choice((1, 2)))
    cells.sort()
    cell = size / 3
    parts = []
    for r, c in cells:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        rad = cell * rng.uniform(0.3, 0.45)
        cx = (c + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        cy = (r + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        draw_shape(draw, shape, cx, cy, rad, COLORS[color])
        parts.append(f"a {color} {shape} in {place_name(r, c)}")
    return im, " and ".join(parts) + " ."


def demo_folder(train_shards: str, val_shards: str = "") -> Path:
    """The folder the demo generator may fill for these shard patterns; raises ``ValueError`` saying why not.

    The generator writes ``DIR/train-*.tar`` and ``DIR/val-*.tar`` (with ``.idx`` sidecars), so the patterns must be
    exactly those (``val_shards`` may be ``""``), and ``DIR`` must not exist yet or be an empty folder: demo data is
    never written next to other files, so a mistyped path cannot overwrite anything of the user's.
    """
    train = Path(train_shards)
    folder = train.parent
    if train.name != "train-*.tar" or "," in train_shards:
        raise ValueError(f"data.train_shards = {train_shards!r} matches no shard. (Demo data is generated only for a "
                         f"pattern of the form DIR/train-*.tar with data.generate_demo_data = true.)")
    if val_shards and Path(val_shards) != folder / "val-*.tar":
        raise ValueError(f"data.val_shards = {val_shards!r}: the demo generator writes the held-out shards to "
                         f"{str(folder / 'val-*.tar')!r}; point data.val_shards there or set it to ''")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"data.train_shards = {train_shards!r}: {str(folder)!r} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"data.train_shards = {train_shards!r} matches no shard, and its folder {str(folder)!r} is "
                         f"not empty: demo data is only generated into a new or empty folder (nothing was written). "
                         f"Point data.train_shards at your shards, or at a new folder for the demo data.")
    return folder


def demo_data_folder(train_shards: str) -> Path | None:
    """The demo generator's folder when ``train_shards`` is the demo's data: ``DIR/train-*.tar`` where the demo's
    probe set already lies (``DIR/probe/train``) or no shard is yet (so the generator would write it); else None
    (the user's own data, even when named ``train-*.tar``)."""
    train = Path(train_shards)
    if train.name != "train-*.tar" or any(c in train_shards for c in ",;{") or "://" in train_shards:
        return None
    folder = train.parent
    if (folder / "probe" / "train").is_dir() or not any(folder.glob("train-*.tar")):
        return folder
    return None


def _refuse_existing(paths: list[Path]) -> None:
    for p in paths:
        for q in (p, p.with_name(p.name + ".idx")):
            if q.exists():
                raise FileExistsError(f"{str(q)!r} exists: the generator never writes over a file (nothing was written)")


def generate_shards(out_dir: str | Path, *, num_train: int = 4000, num_val: int = 64, size: int = 64,
                    per_shard: int = 1000, seed: int = 0) -> dict[str, list[str]]:
    """Write ``train-*.tar`` and ``val-*.tar`` (``key.jpg`` + ``key.txt``) and their manifest into ``out_dir``;
    returns the paths.

    Deterministic for a seed. Raises ``FileExistsError`` before writing anything if any shard (or its index) it would
    write exists already.
    """
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    splits = (("train", num_train), ("val", num_val))
    _refuse_existing([out_dir / f"{split}-{k:06d}.tar" for split, n in splits for k in range(-(-n // per_shard))])
    paths: dict[str, list[str]] = {"train": [], "val": []}
    entries: dict[str, dict] = {}
    for split, n in splits:
        for start in range(0, n, per_shard):
            samples = []
            for i in range(start, min(n, start + per_shard)):
                im, caption = render(rng, size)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=92)
                samples.append((f"{split}{i:07d}", {"jpg": buf.getvalue(), "txt": caption.encode()}))
            path = out_dir / f"{split}-{start // per_shard:06d}.tar"
            entries[path.name] = shard_entry(path, write_shard(path, samples))
            paths[split].append(str(path))
    update_manifest(out_dir, entries)
    return paths


def render_probe(rng: random.Random, label: str, size: int = 64):
    """One linear-probe image (PIL, RGB, ``size x size``) whose largest object is a ``label`` shape.

    Drawn like :func:`render`'s images (same colours, shapes and 3x3 layout). Half of them hold a second, smaller
    object (at most 60% of the largest one's size) of another shape, so the label, the shape of the largest object,
    is never ambiguous and a feature that only says "a circle is somewhere" is not enough.
    """
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), tuple(rng.randint(10, 60) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.choice((1, 2)))
    cell = size / 3
    big = rng.uniform(0.38, 0.48)
    objects = [(label, big)] + [(rng.choice([s for s in SHAPES if s != label]), big * rng.uniform(0.4, 0.6))
                                for _ in cells[1:]]
    for (r, c), (shape, scale) in zip(cells, objects):
        cx = (c + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        cy = (r + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        draw_shape(draw, shape, cx, cy, cell * scale, COLORS[rng.choice(list(COLORS))])
    return im


def generate_probe_set(out_dir: str | Path, *, num_train: int = 200, num_val: int = 100, size: int = 64,
                       seed: int = 0) -> dict[str, Path]:
    """A labelled image set for the linear probe, in ImageFolder layout: ``out_dir/{train,val}/<shape>/<n>.jpg``,
    one class per shape (4 classes, balanced; chance is 25%), labelled by the shape of the largest object
    (:func:`render_probe`). Returns ``{"train": path, "val": path}``.

    Deterministic for a seed, and drawn from a random stream of its own (the shard generator's images are not
    repeated here). Raises ``FileExistsError`` before writing anything if either split's folder exists.
    """
    out_dir = Path(out_dir)
    splits = {"train": out_dir / "train", "val": out_dir / "val"}
    for p in splits.values():
        if p.exists():
            raise FileExistsError(f"{str(p)!r} exists: the generator never writes over files (nothing was written)")
    rng = random.Random(seed * 1_000_003 + 0x9E37)
    for split, n in (("train", num_train), ("val", num_val)):
        for i in range(n):
            label = SHAPES[i % len(SHAPES)]
            folder = splits[split] / label
            folder.mkdir(parents=True, exist_ok=True)
            render_probe(rng, label, size).save(folder / f"{i:05d}.jpg", format="JPEG", quality=92)
    return splits


def write_demo_tokenizer(path: str | Path) -> None:
    """Regenerate the bundled word-level tokenizer from the generator's vocabulary."""
    from .tokenizer import build_word_tokenizer

    build_word_tokenizer(WORDS).save(str(path), pretty=True)


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-sized JPEG (smooth colour fields, shapes and sensor-like noise) whose file size and decode cost are
    close to a real photo's of the same size (e.g. ~60-100 KB at 500x375)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    im = Image.fromarray(low).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(4, max(5, min(width, height) // 3)))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    arr = np.asarray(im, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def generate_photo_shards(out_dir: str | Path, sizes: list[tuple[int, int]], *, num: int = 256,
                          per_shard: int = 128, seed: int = 0, prefix: str = "photos") -> list[str]:
    """Shards of photo-sized JPEGs (``sizes`` cycled, as (width, height)) with short captions, for benchmarks.
    Like ``generate_shards``, never writes over an existing file."""
    out_dir = Path(out_dir)
    _refuse_existing([out_dir / f"{prefix}-{k:06d}.tar" for k in range(-(-num // per_shard))])
    paths = []
    entries: dict[str, dict] = {}
    rng = random.Random(seed)
    for start in range(0, num, per_shard):
        samples = []
        for i in range(start, min(num, start + per_shard)):
            w, h = sizes[i % len(sizes)]
            _, caption = render(rng, 8)
            samples.append((f"{prefix}{i:07d}", {"jpg": photo_jpeg(w, h, seed * 1_000_003 + i),
                                                  "txt": caption.encode()}))
        path = out_dir / f"{prefix}-{start // per_shard:06d}.tar"
        entries[path.name] = shard_entry(path, write_shard(path, samples))
        paths.append(str(path))
    update_manifest(out_dir, entries)
    return paths


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="generate the shapes dataset as webdataset shards")
    ap.add_argument("out_dir")
    ap.add_argument("--num-train", type=int, default=4000)
    ap.add_argument("--num-val", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--write-tokenizer", metavar="PATH", help="also write the word-level tokenizer here")
    a = ap.parse_args()
    print(generate_shards(a.out_dir, num_train=a.num_train, num_val=a.num_val, size=a.size))
    if a.write_tokenizer:
        write_demo_tokenizer(a.write_tokenizer)
