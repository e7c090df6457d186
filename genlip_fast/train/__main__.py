"""``python -m genlip_fast.train [--config NAME_OR_TOML] [--section.key=value ...]``

With no arguments: the tiny demo on generated shapes, on CPU, in a few minutes. On GPUs, one process per GPU::

    torchrun --nproc_per_node=8 -m genlip_fast.train --config so16_stage1 --data.train_shards=/data/s1/{...}.tar
    srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_ADDR:29500 --rdzv_id=$SLURM_JOB_ID --max-restarts=3 -m genlip_fast.train ...

A run resumes from the latest checkpoint in its out_dir by itself (after a crash, a restart or preemption).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="genlip-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="bundled preset name or TOML path (default: tiny)")
    ap.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    args, rest = ap.parse_known_args(argv)
    rank = int(os.environ.get("RANK", 0))
    # Logs from rank 0 only; other ranks still report warnings and errors.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        print(f"genlip-train: config error: {e}", file=sys.stderr)
        return 2
    from .metrics import describe_eval
    from .trainer import train

    try:
        result = train(cfg, progress=not args.no_progress)
    except ConfigError as e:  # bad input found at start (every rank finds it alike), before anything is written
        print(f"genlip-train: config error: {e}", file=sys.stderr)
        return 2
    if rank != 0:
        return 128 + result["signal"] if result["stopped_by"] == "signal" else 0
    losses = result["losses"]
    if losses:
        k = max(1, min(20, len(losses) // 10))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"\nloss: first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    if result["evals"]:
        print(f"\nheld-out evaluation (every {cfg.eval.every} steps and at the end):")
        for e in result["evals"]:
            print(f"  step {e['step']:>5}: {describe_eval(e)}")
    if result["captions"]:
        print("\nLet ViT Speak — held-out images:")
        for c in result["captions"]:
            print(f"  true:      {c['true']}\n  generated: {c['generated']}\n")
    if result["stopped_by"] == "signal":
        return 128 + result["signal"]  # as if killed by it: a scheduler or torchrun may restart the job
    return 0


if __name__ == "__main__":
    sys.exit(main())
