"""What a user watches: a progress bar, log lines, JSONL metrics and TensorBoard scalars — from rank 0 only."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger("genlip_fast.train")


def _fmt_rate(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


EVAL_PREFIXES = ("val_", "probe_", "eval_")
"""Keys of an evaluation's figures in a step's row (``train/evaluate.py``); TensorBoard files them under ``eval/``."""


def describe_eval(row: dict) -> str:
    """``val loss 0.5120 · BLEU-4 0.812 · CIDEr 6.21 · exact 50% · probe top-1 88.0% (2.1 s)``, from what is there."""
    parts = []
    if "val_loss" in row:
        parts.append(f"val loss {row['val_loss']:.4f}")
    if "val_bleu4" in row:
        parts.append(f"BLEU-4 {row['val_bleu4']:.3f} · CIDEr {row['val_cider']:.2f} · "
                     f"exact {100 * row['val_exact_match']:.0f}%")
    if "probe_top1" in row:
        parts.append(f"probe top-1 {100 * row['probe_top1']:.1f}%")
    return " · ".join(parts) + (f" ({row['eval_time_s']:.1f} s)" if "eval_time_s" in row else "")


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the rows after ``step`` (a resumed run logs those steps again) and any unreadable line — a kill while
    a row was written leaves a torn last line — with a warning; the file is replaced in one rename."""
    kept, torn = [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            torn.append(i)
        elif row.get("step", 0) <= step:
            kept.append(line)
    if torn:
        log.warning("%s: dropped %d unreadable line(s) (line %s; a row cut short when the run was killed)", path,
                    len(torn), ", ".join(map(str, torn[:5])) + (" ..." if len(torn) > 5 else ""))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsLogger:
    """One row per optimizer step to ``out_dir/metrics.jsonl`` (appended to when a run resumes), TensorBoard scalars
    under ``out_dir/tb`` (imported only when enabled), and a tqdm bar or periodic log lines. Ranks other than 0 get
    an inert logger."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True, tensorboard: bool = True, log_every: int = 10):
        self.enabled, self.log_every = enabled, max(1, log_every)
        self._jsonl = self._tb = self._bar = None
        self._last_eval: dict[str, str] = {}  # the latest evaluation's figures, shown with every step's
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        if start_step > 0 and path.is_file():
            _keep_rows_up_to(path, start_step)
            for line in path.read_text().splitlines():  # a resumed run shows the last evaluation until it makes one
                self._remember_eval(json.loads(line))
        self._jsonl = open(path, "a" if start_step > 0 else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                log.warning("tensorboard is not installed; no TensorBoard scalars (pip install tensorboard)")
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        step = row["step"]
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{'eval' if k.startswith(EVAL_PREFIXES) else 'train'}/{k}", v, step)
        if self._remember_eval(row):
            self.message(f"eval at step {step}: {describe_eval(row)}")
        if "loss" not in row:  # the evaluation before the first step: no step figures, no bar tick
            return
        mfu = row.get("mfu")
        mem = row.get("peak_mem_gib")
        fields = {
            "loss": f"{row['loss']:.4f}",
            "lr": f"{row['lr']:.2e}",
            "tok/s": _fmt_rate(row["tokens_per_s"]),
            "samples/s": _fmt_rate(row["samples_per_s"]),
            "mfu": f"{100 * mfu:.1f}%" if mfu is not None else "n/a",
            "mem": f"{mem:.1f}G" if mem is not None else "n/a",
            "data": f"{row['data_wait_s'] * 1e3:.0f}ms",
        }
        fields.update(self._last_eval)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(fields, refresh=False)
        elif step % self.log_every == 0:
            log.info("step %d %s", step, " ".join(f"{k} {v}" for k, v in fields.items()))

    def _remember_eval(self, row: dict) -> bool:
        """Keep the figures of an evaluation row for the progress bar; False if ``row`` holds none."""
        if "val_loss" in row:
            self._last_eval["val"] = f"{row['val_loss']:.4f}"
        if "probe_top1" in row:
            self._last_eval["probe"] = f"{100 * row['probe_top1']:.1f}%"
        return any(k.startswith(EVAL_PREFIXES) for k in row)

    def message(self, text: str, level: int = logging.INFO) -> None:
        """A log line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None and level < logging.WARNING:
            self._bar.write(text)
        else:
            log.log(level, text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
