"""Curves of a run: ``python -m genlip_fast.train.plot RUN_DIR [-o curves.png]``.

Reads ``RUN_DIR/metrics.jsonl`` (one row per step; evaluation figures on the rows of evaluated steps) and draws one
panel each for the loss (training, and validation where evaluated), the learning rate, tokens/s, and, when the run
has them, the linear probe's top-1 accuracy and the captioning metrics. Needs matplotlib (``pip install
'genlip_fast[plot]'``); it is imported only here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PANELS = (
    ("loss", (("loss", "training"), ("val_loss", "validation")), "caption-token loss"),
    ("learning rate", (("lr", "lr"),), "lr"),
    ("tokens/s", (("tokens_per_s", "tokens/s"),), "tokens/s"),
    ("probe top-1", (("probe_top1", "validation"), ("probe_train_top1", "training")), "accuracy"),
    ("captioning", (("val_bleu4", "BLEU-4"), ("val_exact_match", "exact match")), "score"),
)
"""``(title, ((metrics key, legend), ...), y label)``; a panel whose keys the run never logged is left out."""


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (``FileNotFoundError`` naming the file when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {str(path)!r} (is {str(run_dir)!r} a run's train.out_dir?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the rows that have a number for ``key``."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_run(run_dir: str | Path, out: str | Path) -> list[str]:
    """Write the run's curves to ``out`` (PNG, or any format matplotlib knows by the suffix); returns the titles
    of the panels drawn, top to bottom."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'genlip_fast[plot]' (or pip install matplotlib)") \
            from e
    rows = read_metrics(run_dir)
    panels = [(title, [(label, *series(rows, key)) for key, label in lines], ylabel)
              for title, lines, ylabel in PANELS]
    panels = [(t, [ln for ln in lines if ln[1]], y) for t, lines, y in panels if any(ln[1] for ln in lines)]
    if not panels:
        raise ValueError(f"{str(Path(run_dir) / 'metrics.jsonl')!r} has no step rows to plot")
    fig = Figure(figsize=(8, 2.4 * len(panels)), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, lines, ylabel) in zip(axes, panels):
        for label, steps, values in lines:
            dense = len(steps) > 50
            ax.plot(steps, values, label=label, linewidth=0.8 if dense else 1.5, marker=None if dense else "o",
                    markersize=3)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if title == "loss" and all(v > 0 for _, _, vals in lines for v in vals if math.isfinite(v)):
            ax.set_yscale("log")
        if len(lines) > 1:
            ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")
    fig.suptitle(str(run_dir))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out), dpi=100)
    return [title for title, _, _ in panels]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m genlip_fast.train.plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run's train.out_dir (holds metrics.jsonl)")
    ap.add_argument("-o", "--out", default=None, help="output image (default: RUN_DIR/curves.png)")
    args = ap.parse_args(argv)
    out = args.out or str(Path(args.run_dir) / "curves.png")
    try:
        titles = plot_run(args.run_dir, out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {', '.join(titles)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
