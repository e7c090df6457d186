"""What a dataset holds, as the trainer will see it, before any GPU is booked.

::

    python -m genlip_fast.data report '/data/s2/*.tar' --stage 2 --sample 20000
    python -m genlip_fast.data report data/shapes/train-*.tar --tokenizer demo --image-size 64 --pack-tokens 1024

Reads a sample of the records (spread over the shards; ``--sample 0`` = every record) through the training
reader — the same checks, caption rule and tokenizer, no image decode — and prints, and writes as JSON:

* shards and samples (from the folders' manifests, else counted or estimated from the shards read), shards that
  cannot be read and why, bad records by reason;
* caption length in tokens (end-of-text included: percentiles, and the share cut at ``--max-caption-tokens``), and
  the prompt's where the caption rule keeps a conversation's question (``conv+prompt``);
* image sizes, patches per image (stage 2: the 16–1024-patch grid), tokens per sample;
* the packing the loader will make: pack fill and samples per ``--pack-tokens`` pack (the packer itself, with the
  stage's look-ahead), samples too long for a pack;
* steps per epoch at ``--global-batch`` samples per step, and the packs per step the trainer plans with
  ``train.tokens_per_sample`` set to the measured mean.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import storage
from .batch import Sample
from .captions import parse_rule
from .manifest import dataset_size
from .packing import Packer, SampleTooLongError
from .reader import Record, ShardReader, SkipCounter
from .specs import expand_spec, split_sources
from .tokenizer import load_tokenizer
from .transforms import check_grid_limits, grid_for

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
SHARDS_SPREAD = 100
"""A sample is spread over at most this many shards (picked at random), an equal share from each."""


@dataclass
class ReportOptions:
    stage: int = 1
    sample: int = 10000
    """Records to read (0 = all)."""
    tokenizer: str = "qwen"
    caption: str = "auto"
    """Where the captions are, as data.caption (a caption rule)."""
    image_column: str = ""
    image_size: int = 224
    patch_size: int = 16
    min_patches: int = 16
    max_patches: int = 1024
    pack_tokens: int = 16384
    lookahead: int = 0
    """0 = the stage's usual: 1 (stage 1), 64 (stage 2)."""
    max_caption_tokens: int = 0
    global_batch: int = 0
    """0 = the paper's: 32,768 (stage 1), 3,600 (stage 2)."""
    seed: int = 0
    storage_options: dict = field(default_factory=dict)


def summary(values) -> dict:
    """``{"mean", "min", "p1", ..., "p99", "max"}`` of a list of numbers (empty: ``{}``)."""
    if len(values) == 0:
        return {}
    a = np.asarray(values, dtype=np.float64)
    out = {"mean": round(float(a.mean()), 2), "min": float(a.min())}
    out.update({f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES})
    out["max"] = float(a.max())
    return out


def read_records(reader: ShardReader, n: int, seed: int, skipped: SkipCounter, bar,
                 ) -> tuple[list[Record], int, dict[int, int]]:
    """Read every record (``n == 0``), or about ``n`` spread over up to :data:`SHARDS_SPREAD` shards in a seeded
    random order (a random subset of each), a shard's records right after it is opened (so each shard is opened
    once, whatever the reader keeps open); bad ones counted in ``skipped``. Returns ``(good records, records read,
    {shard opened: its samples})``."""
    order = list(range(len(reader.shards)))
    if n:
        random.Random(seed).shuffle(order)
    quota = math.ceil(n / min(len(order), SHARDS_SPREAD)) if n else None
    records, read, counts = [], 0, {}
    rng = random.Random(seed + 1)
    for s in order:
        if n and read >= n:
            break
        count = counts[s] = reader.count(s, skipped)
        ids = range(count) if quota is None else sorted(rng.sample(range(count), min(quota, count, n - read)))
        for i in ids:
            r = reader.read(s, i)
            if isinstance(r, Record):
                records.append(r)
            else:
                skipped.skip(r.reason, r.shard, r.key, r.detail)
            bar.update(1)
        read += len(ids)
        bar.set_postfix(shards=len(counts))
    return records, read, counts


def predicted_packing(lengths: list[tuple[int, int]], pack_tokens: int, lookahead: int) -> dict:
    """Pack ``(patches, text tokens)`` samples as the loader would (the :class:`Packer`, no truncation): fill and
    samples per pack over the packs a stream would close (the remainder held at the end of a finite sample counts
    only when nothing else closed), and how many samples are too long for a pack."""
    packer = Packer(pack_tokens, lookahead=lookahead)
    closed: list[tuple[int, int]] = []  # (samples, tokens) per pack
    too_long = 0
    for p, t in lengths:
        try:
            packer.place(Sample(torch.empty(p, 0), (1, p), torch.zeros(t, dtype=torch.int64)))
        except SampleTooLongError:
            too_long += 1
            continue
        closed += [(b.num_samples, int(b.cu_seqlens[-1])) for b in packer.ready()]
    if not closed:
        closed = [(b.num_samples, int(b.cu_seqlens[-1])) for b in packer.flush()]
    n = max(1, len(closed))
    return {"pack_tokens": pack_tokens, "lookahead": lookahead, "packs": len(closed),
            "fill": round(sum(t for _, t in closed) / (n * pack_tokens), 4),
            "samples_per_pack": round(sum(s for s, _ in closed) / n, 2), "too_long_for_a_pack": too_long}


def build_report(spec: str, opt: ReportOptions, *, progress: bool = True) -> dict:
    """Scan ``spec`` (a shard spec as ``data.train_shards`` takes it) and return the report (plain JSON types)."""
    from tqdm import tqdm

    if opt.stage not in (1, 2):
        raise ValueError(f"--stage must be 1 or 2, got {opt.stage}")
    if opt.stage == 2:
        check_grid_limits(opt.min_patches, opt.max_patches)
    storage.configure(opt.storage_options)
    lookahead = opt.lookahead or (1 if opt.stage == 1 else 64)
    global_batch = opt.global_batch or (32768 if opt.stage == 1 else 3600)
    tok = load_tokenizer(opt.tokenizer)
    shards = [s for part in split_sources(spec) for s in expand_spec(part)]  # 'p1;p2': one population
    reader = ShardReader(shards, stage=opt.stage, patch=opt.patch_size, caption=parse_rule(opt.caption),
                         image_column=opt.image_column, keep_open=4)
    skipped = SkipCounter()
    listed, _, missing = dataset_size(shards)
    total = None if missing else listed  # what the bar runs to: the records to read, where known
    if opt.sample:
        total = opt.sample if total is None else min(opt.sample, total)
    bar = tqdm(desc="scanning", unit=" samples", total=total, disable=not progress, file=sys.stderr)
    try:
        records, read, counts = read_records(reader, opt.sample, opt.seed, skipped, bar)
    finally:
        bar.close()
        reader.close()
    cap_tokens = []
    for k in range(0, len(records), 512):
        cap_tokens += [len(ids) for ids in tok.encode_batch([r.caption for r in records[k:k + 512]], add_eot=True)]
    # a conversation's question kept as the prompt (conv+prompt) is in the sample too, as the loader packs it
    prompts = sorted({r.prompt for r in records if r.prompt})
    prompt_len = dict(zip(prompts, map(len, tok.encode_batch(prompts)))) if prompts else {}
    prompt_tokens = [prompt_len[r.prompt] if r.prompt else 0 for r in records]
    grids = [grid_for(r.hw[0], r.hw[1], stage=opt.stage, image_size=opt.image_size, patch=opt.patch_size,
                      min_patches=opt.min_patches, max_patches=opt.max_patches) for r in records]
    patches = [h * w for h, w in grids]
    cap = opt.max_caption_tokens
    text = [(min(t, cap) if cap else t) + p for t, p in zip(cap_tokens, prompt_tokens)]
    lengths = list(zip(patches, text))

    good_share = len(records) / read if read else 0.0
    # the shards opened for the records, counted then (an unreadable one holds 0 samples)
    if not missing:
        samples, source = listed, "manifest"
    elif len(counts) == len(shards):
        samples, source = sum(counts.values()), "counted"
    else:
        samples = round(sum(counts.values()) / max(1, len(counts)) * len(shards))
        source = f"estimated from {len(counts)} of {len(shards)} shards"
    usable = round(samples * good_share)
    packing = predicted_packing(lengths, opt.pack_tokens, lookahead)
    mean_tokens = float(np.mean([p + t for p, t in lengths])) if lengths else 0.0
    per_pack_plan = max(1, math.floor(opt.pack_tokens / mean_tokens)) if mean_tokens else 0
    return {
        "spec": spec, "stage": opt.stage, "tokenizer": opt.tokenizer, "caption": opt.caption,
        "dataset": {"shards": len(shards), "samples": samples, "samples_from": source,
                    "bad_shards": dict(reader.bad_shards)},
        "scanned": {"shards": len(counts), "records": read, "good": len(records),
                    "skipped": dict(sorted(skipped.counts.items())),
                    "good_share": round(good_share, 4)},
        "caption_tokens": {**summary(cap_tokens), "cap": cap,
                           "share_cut": round(sum(t > cap for t in cap_tokens) / len(cap_tokens), 4)
                           if cap and cap_tokens else 0.0},
        "prompt_tokens": summary(prompt_tokens) if prompts else {},
        "image_size": {"height": summary([r.hw[0] for r in records]), "width": summary([r.hw[1] for r in records])},
        "patches_per_image": summary(patches),
        "tokens_per_sample": summary([p + t for p, t in lengths]),
        "packing": packing,
        "steps": {"global_batch": global_batch, "usable_samples": usable,
                  "steps_per_epoch": math.ceil(usable / global_batch) if usable else 0,
                  "tokens_per_sample": round(mean_tokens, 1),
                  "packs_per_step": math.ceil(global_batch / per_pack_plan) if per_pack_plan else 0},
    }


def format_report(rep: dict) -> str:
    """The report as the lines ``python -m genlip_fast.data report`` prints."""
    d, sc, c, st, pk = rep["dataset"], rep["scanned"], rep["caption_tokens"], rep["steps"], rep["packing"]

    def pct(s: dict, keys=("p5", "p50", "p95", "p99", "max")) -> str:
        return "  ".join(f"{k} {s[k]:g}" for k in ("mean", *keys) if k in s) if s else "-"

    lines = [f"{rep['spec']}  (stage {rep['stage']}, tokenizer {rep['tokenizer']})",
             f"shards          {d['shards']:,}" + (f"  ({len(d['bad_shards'])} unreadable)" if d["bad_shards"] else ""),
             f"samples         {d['samples']:,}  ({d['samples_from']})",
             f"scanned         {sc['records']:,} records in {sc['shards']:,} shards: {sc['good']:,} good "
             f"({100 * sc['good_share']:.1f}%)"]
    for reason, n in sc["skipped"].items():
        lines.append(f"  skipped       {n:,}  {reason}")
    for path, why in list(d["bad_shards"].items())[:5]:
        lines.append(f"  bad shard     {path}: {why}")
    cut = f"  cut at {c['cap']}: {100 * c['share_cut']:.1f}%" if c["cap"] else ""
    lines.append(f"caption tokens  {pct(c)}{cut}")
    if rep["prompt_tokens"]:
        lines.append(f"prompt tokens   {pct(rep['prompt_tokens'])}")
    lines += [f"image height    {pct(rep['image_size']['height'])}",
              f"image width     {pct(rep['image_size']['width'])}",
              f"patches/image   {pct(rep['patches_per_image'])}",
              f"tokens/sample   {pct(rep['tokens_per_sample'])}",
              f"packing         fill {100 * pk['fill']:.1f}%, {pk['samples_per_pack']:g} samples per "
              f"{pk['pack_tokens']:,}-token pack (look-ahead {pk['lookahead']})"
              + (f", {pk['too_long_for_a_pack']:,} too long for a pack" if pk["too_long_for_a_pack"] else ""),
              f"steps/epoch     {st['steps_per_epoch']:,} at {st['global_batch']:,} samples per step "
              f"({st['usable_samples']:,} usable samples); {st['packs_per_step']:,} packs per step with "
              f"--train.tokens_per_sample={st['tokens_per_sample']:g}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    d = ReportOptions()
    ap = argparse.ArgumentParser(prog="python -m genlip_fast.data report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("::")[1])
    ap.add_argument("spec", help="shards as data.train_shards takes them (paths, globs, brace ranges, folders, URLs; "
                                 "commas; 'p1;p2' read as one)")
    ap.add_argument("--stage", type=int, default=d.stage, choices=(1, 2))
    ap.add_argument("--sample", type=int, default=d.sample, help=f"records to read (0 = all; default {d.sample})")
    ap.add_argument("--tokenizer", default=d.tokenizer, help="as data.tokenizer (default: qwen, as real runs)")
    ap.add_argument("--caption", default=d.caption, help="as data.caption: a caption rule (default: auto)")
    ap.add_argument("--image-column", default=d.image_column, help="as data.image_column (Parquet)")
    ap.add_argument("--image-size", type=int, default=d.image_size, help="stage 1 (default 224)")
    ap.add_argument("--patch-size", type=int, default=d.patch_size)
    ap.add_argument("--min-patches", type=int, default=d.min_patches, help="stage 2")
    ap.add_argument("--max-patches", type=int, default=d.max_patches, help="stage 2")
    ap.add_argument("--pack-tokens", type=int, default=d.pack_tokens)
    ap.add_argument("--lookahead", type=int, default=d.lookahead, help="0 = the stage's usual (1, or 64)")
    ap.add_argument("--max-caption-tokens", type=int, default=d.max_caption_tokens, help="the caption cap (0: none)")
    ap.add_argument("--global-batch", type=int, default=d.global_batch,
                    help="samples per step (0 = the paper's: 32768 in stage 1, 3600 in stage 2)")
    ap.add_argument("--storage-options", default="", help="as data.storage_options, in JSON")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--json", default="data-report.json", help="where to write the report as JSON "
                                                                 "(default: data-report.json; '' = nowhere)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        opts = json.loads(a.storage_options) if a.storage_options else {}
        opt = ReportOptions(**{k: v for k, v in vars(a).items() if k in ReportOptions.__dataclass_fields__
                               and k != "storage_options"}, storage_options=opts)
        rep = build_report(a.spec, opt, progress=not a.no_progress)
    except (OSError, ValueError, storage.StorageSetupError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    print(format_report(rep))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**rep, "options": asdict(opt)}, f, indent=2)
        print(f"(written to {a.json})")
    return 0
