"""The derived figures of a benchmark run, one table per benchmark file: median time, useful TFLOP/s, throughput
(images/s, tokens/s, ...), peak memory and speed-up over the file's baseline measured in the same run.

They are printed at the end of ``pytest benchmarks/ --benchmark-only`` (``benchmarks/conftest.py``), and from a
pytest-benchmark JSON file as the markdown recorded in ``benchmarks/results/``::

    python benchmarks/summarize.py bench_attention.json bench_data.json ... --command "bash scripts/gpu_check.sh"

and a training run's ``metrics.jsonl`` as the trainer's own numbers (``--train``; ``scripts/gpu_check.sh train``), or
the loss curves of several runs on the same data side by side (``--compare-loss``; ``scripts/gpu_check.sh float8``).

Everything is read from the ``extra_info`` the benchmarks record (``_utils.run_benchmark``) and their parameters.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
from pathlib import Path

BASELINES = {
    "bench_attention": ({"impl"}, {"impl": "reference"}),
    "bench_linear_cross_entropy": ({"impl"}, {"impl": "eager"}),
    "bench_train_step": ({"name", "attn", "ce"}, {"name": "reference"}),
    "bench_data": ({"backend"}, {"backend": "host"}),
    "bench_speak": ({"path"}, {"path": "recompute"}),
    "bench_float8": ({"name", "recipe", "filter"}, {"recipe": "off"}),
}
"""Per benchmark file: the parameters that name the implementation, and the values of its baseline. Rows whose other
parameters agree (same shape, mode, stage) are compared with the baseline row among them."""

RATES = (("images_per_s", "images/s"), ("tokens_per_s", "tokens/s"), ("samples_per_s", "samples/s"),
         ("packs_per_s", "packs/s"), ("captions_per_s", "captions/s"))
"""Throughput fields of ``extra_info``, the first one present is shown (and used for the speed-up)."""

SHOWN = {"gpu", "device", "torch", "triton", "name", "median_ms", "tflops", "peak_mem_gib"}
"""``extra_info`` fields that have a column or the header line (with the throughput shown); the markdown lists the
others per row."""


def bench_file(bench: dict) -> str:
    """``bench_attention`` for ``benchmarks/bench_attention.py::test_attention[...]``."""
    return Path(bench.get("fullname", bench["name"]).split("::")[0]).stem


def _rate(bench: dict) -> tuple[str, float | None, str]:
    """``(extra_info key, value, unit)`` of the throughput shown, or ``("", None, "")``."""
    e = bench.get("extra_info", {})
    for key, unit in RATES:
        if isinstance(e.get(key), (int, float)):
            return key, float(e[key]), unit
    return "", None, ""


def _median_s(bench: dict) -> float:
    e = bench.get("extra_info", {})
    return e["median_ms"] / 1e3 if isinstance(e.get("median_ms"), (int, float)) else bench["stats"]["median"]


def derived_rows(benches: list[dict]) -> dict[str, list[dict]]:
    """``{file: [row, ...]}`` in run order; a row holds ``label``, ``ms``, ``tflops``, ``rate``, ``rate_unit``,
    ``mem_gib`` (None where not measured), ``speedup`` over the baseline of its group (None without one) and
    ``extra`` (the other ``extra_info`` fields, as text).
    The speed-up compares throughput where the benchmark records one, else the inverse median time."""
    out: dict[str, list[dict]] = {}
    for b in benches:
        e = b.get("extra_info", {})
        rate_key, rate, unit = _rate(b)
        out.setdefault(bench_file(b), []).append({
            "label": e.get("name") or b["name"], "params": b.get("params") or {}, "ms": _median_s(b) * 1e3,
            "tflops": e.get("tflops"), "rate": rate, "rate_unit": unit, "mem_gib": e.get("peak_mem_gib"),
            "speedup": None, "extra": ", ".join(f"{k}={v}" for k, v in e.items() if k not in SHOWN and k != rate_key),
        })
    for name, rows in out.items():
        impl_keys, base = BASELINES.get(name, (set(), None))
        if base is None:
            continue

        def group(r, impl_keys=impl_keys):
            return tuple(sorted((k, str(v)) for k, v in r["params"].items() if k not in impl_keys))

        def speed(r):
            return r["rate"] if r["rate"] else 1e3 / r["ms"]

        baselines = {group(r): r for r in rows if all(r["params"].get(k) == v for k, v in base.items())}
        for r in rows:
            ref = baselines.get(group(r))
            if ref is not None and speed(ref) > 0:
                r["speedup"] = speed(r) / speed(ref)
    return out


def _num(x, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _cells(r: dict) -> list[str]:
    rate = f"{_num(r['rate'], ',.0f')} {r['rate_unit']}" if r["rate"] is not None else "—"
    return [r["label"], _num(r["ms"], ".3f"), _num(r["tflops"], ".1f"), rate, _num(r["mem_gib"], ".2f"),
            f"{r['speedup']:.2f}x" if r["speedup"] is not None else "—"]


HEADER = ["benchmark", "median ms", "TFLOP/s", "throughput", "peak mem GiB", "speed-up"]


def terminal_tables(benches: list[dict]) -> list[str]:
    """Lines of one aligned table per benchmark file (what the terminal shows after the run)."""
    lines = []
    for name, rows in derived_rows(benches).items():
        base = BASELINES.get(name, (None, None))[1]
        title = f"{name}: speed-up over {', '.join(f'{k}={v}' for k, v in base.items())}" if base else name
        table = [HEADER] + [_cells(r) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
        lines += ["", title]
        for i, row in enumerate(table):
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
    return lines


def _provenance() -> str:
    """``commit: <short hash>; date: <today>`` of the checkout the results are recorded from."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"commit: {commit or '?'}; date: {datetime.date.today().isoformat()}"


def markdown(benches: list[dict], command: str) -> list[str]:
    """The markdown block recorded in ``benchmarks/results/``: where and how it was measured, then one table per
    file with the remaining ``extra_info`` fields in the last column."""
    info = benches[0]["extra_info"] if benches else {}
    lines = [f"- device: {info.get('gpu', info.get('device', '?'))}; torch {info.get('torch', '?')}; "
             f"triton {info.get('triton', '?')}",
             f"- {_provenance()}",
             f"- command: `{command}`"]
    for name, rows in derived_rows(benches).items():
        lines += ["", f"### {name}", "", "| " + " | ".join(HEADER + ["extra"]) + " |",
                  "|" + "---|" * (len(HEADER) + 1)]
        lines += ["| " + " | ".join(_cells(r) + [r["extra"]]) + " |" for r in rows]
    return lines


def train_summary(rows: list[dict], skip: int, command: str) -> list[str]:
    """The trainer's own steps from its ``metrics.jsonl`` rows, as markdown: the medians of tokens/s, MFU, TFLOP/s per
    rank, step time, data wait and the peak memory over the steps after the first ``skip`` (compile, autotune and
    the first data)."""
    steps = [r for r in rows if "loss" in r and r.get("step", 0) > skip]
    if not steps:
        return [f"- no training step after step {skip} in the metrics (the run stopped early: see train.txt)"]

    def median(key):
        vals = sorted(r[key] for r in steps if isinstance(r.get(key), (int, float)))
        return vals[len(vals) // 2] if vals else None

    peak = max((r["peak_mem_gib"] for r in steps if isinstance(r.get("peak_mem_gib"), (int, float))), default=None)
    mfu, wait, step_s = median("mfu"), median("data_wait_s"), median("step_time_s")
    return [f"- {_provenance()}; command: `{command}`",
            f"- steps {steps[0]['step']}-{steps[-1]['step']} (medians; the first {skip} left out); "
            f"losses {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}",
            "", "| tokens/s | samples/s | MFU | TFLOP/s per rank | step s | data wait s | peak GiB |",
            "|---|---|---|---|---|---|---|",
            f"| {_num(median('tokens_per_s'), ',.0f')} | {_num(median('samples_per_s'), ',.1f')} | "
            f"{'—' if mfu is None else f'{100 * mfu:.1f}%'} | {_num(median('tflops_per_rank'), '.1f')} | "
            f"{_num(step_s, '.3f')} | {_num(wait, '.3f')} | {_num(peak, '.2f')} |"]


def loss_comparison(runs: dict[str, list[dict]], windows: int = 5) -> list[str]:
    """The loss curves of runs on the same data (the first is the reference), as markdown: the mean loss of each run
    over ``windows`` equal spans of the steps they all logged, and each run's difference from the reference."""
    losses = {label: {r["step"]: r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))}
              for label, rows in runs.items()}
    steps = sorted(set.intersection(*(set(v) for v in losses.values()))) if losses else []
    if not steps:
        return ["- no step that every run logged a loss for"]
    labels = list(losses)
    ref = labels[0]
    spans = [steps[i * len(steps) // windows:(i + 1) * len(steps) // windows] for i in range(windows)]
    spans = [s for s in spans if s]
    lines = [f"- mean loss per span of steps; in brackets: the difference from {ref}", "",
             "| steps | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for span in spans:
        means = {lb: sum(losses[lb][s] for s in span) / len(span) for lb in labels}
        cells = [f"{means[ref]:.4f}"] + [f"{means[lb]:.4f} ({100 * (means[lb] / means[ref] - 1):+.2f}%)"
                                         for lb in labels[1:]]
        lines.append(f"| {span[0]}-{span[-1]} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json_files", nargs="*", help="pytest-benchmark JSON files, one table per benchmark file")
    ap.add_argument("--command", default="pytest benchmarks/ --benchmark-only")
    ap.add_argument("--train", metavar="METRICS_JSONL", help="summarise a training run's metrics.jsonl instead")
    ap.add_argument("--skip", type=int, default=10, help="with --train: steps left out at the start")
    ap.add_argument("--compare-loss", nargs="+", metavar="METRICS_JSONL",
                    help="runs on the same data: their loss curves side by side, against the first")
    a = ap.parse_args()
    if a.compare_loss:
        runs = {Path(f).parent.name: [json.loads(line) for line in open(f) if line.strip()]
                for f in a.compare_loss if Path(f).exists()}
        print("\n".join([f"- {_provenance()}; command: `{a.command}`", *loss_comparison(runs)]))
        return
    if a.train:
        rows = [json.loads(line) for line in open(a.train) if line.strip()] if Path(a.train).exists() else []
        print("\n".join(train_summary(rows, a.skip, a.command)))
        return
    benches = [b for f in a.json_files for b in json.load(open(f)).get("benchmarks", [])]
    print("\n".join(markdown(benches, a.command)))


if __name__ == "__main__":
    main()
