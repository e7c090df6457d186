"""``python -m genlip_fast.train [--config NAME_OR_TOML] [--section.key=value ...]``

With no arguments: the tiny demo on generated shapes, on CPU, in a few minutes. On GPUs, one process per GPU::

    torchrun --nproc_per_node=8 -m genlip_fast.train --config so16_stage1 --data.train_shards=/data/s1/{...}.tar
    srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_ADDR:29500 --rdzv_id=$SLURM_JOB_ID --max-restarts=3 -m genlip_fast.train ...

A run resumes from the newest checkpoint in its out_dir that passes its check, by itself (after a crash, a restart
or preemption). Preemption under torchrun / Slurm: SIGTERM, SIGUSR1 or SIGUSR2 to torchrun or to any worker (Slurm:
``#SBATCH --signal=TERM@300`` or ``--signal=USR1@300``, with ``PET_SIGNALS_TO_HANDLE`` as in
``scripts/slurm/train.sbatch``): every worker finishes its step and saves, and torchrun's restarts do not resume
the run. Ctrl-C once: the same; twice: stop now.

Exit status (the same on every rank): 0 done; 2 a config or input error found at start (one line, nothing
written), or data no sample of which can be used (one line); 1 a failure with a named cause (a damaged or refused
checkpoint, no space for a checkpoint, too many NaN steps, a collective that timed out, anything unexpected: one
line, the traceback in ``out_dir/logs/rank<R>.log``); 128 + N stopped by signal N after a checkpoint (143 SIGTERM,
138 SIGUSR1, 140 SIGUSR2, 130 Ctrl-C); 130 also for a second Ctrl-C, which stops without a checkpoint.
"""

from __future__ import annotations

import argparse
import gc
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
    rank = int(os.environ.get("RANK", "0"))
    # Logs from rank 0 only; other ranks still report warnings and errors.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        print(f"genlip-train: config error: {e}", file=sys.stderr)
        return 2
    from . import preflight, runlog
    from ..checkpoint import CheckpointError
    from .metrics import describe_eval
    from .signals import RunStopped, die_with_launcher
    from .step import DataStreamError
    from .trainer import NonFiniteLossError, train
    from .watch import CollectiveError

    def fail(kind: str, e: BaseException | str, code: int, everywhere: bool = False) -> int:
        # Errors after the process group is up are agreed by every rank: rank 0 says it once. The traceback of one
        # that ends a run goes to the rank's log file.
        if isinstance(e, BaseException) and not isinstance(e, (ConfigError, RunStopped)):
            runlog.write_traceback(cfg.train.out_dir, rank, e)
        if rank == 0 or everywhere:
            print(f"genlip-train: {kind}: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return code

    die_with_launcher()
    try:
        preflight.check_device(cfg)  # before the process group, so every rank finds it alone
    except ConfigError as e:
        return fail("config error", e, 2, everywhere=True)
    try:
        result = train(cfg, progress=not args.no_progress)
    except ConfigError as e:  # bad input found at start (every rank finds it alike), before anything is written
        return fail("config error", e, 2)
    except (CheckpointError, NonFiniteLossError) as e:
        return fail("error", e, 1)
    except DataStreamError as e:  # raised on every rank alike, with the same code
        return fail("data error", e, e.code)
    except RunStopped as e:  # torchrun restarted the workers of a stopped run: every rank alike
        return fail("stopped", e, e.code)
    except CollectiveError as e:  # each surviving rank says what it waited for
        return fail("error", e, 1, everywhere=True)
    except KeyboardInterrupt:
        return fail("stopped", "second Ctrl-C: no checkpoint of the step in flight (the last complete one is kept)",
                    130)
    except Exception as e:  # anything else: one line here, the traceback in the log file
        where = runlog.write_traceback(cfg.train.out_dir, rank, e)
        return fail("error", f"{type(e).__name__}: {e}" + (f" (traceback in {where})" if where else ""), 1,
                    everywhere=True)
    code = 128 + result["signal"] if result["stopped_by"] == "signal" else 0  # as if killed by it
    if rank != 0:
        return code
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
    return code


if __name__ == "__main__":
    code = main()
    gc.collect()  # the returned model's cycles, while the runtime they need is whole (distributed.destroy_process_group)
    sys.exit(code)
