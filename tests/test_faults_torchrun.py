"""Faults under torchrun (2 workers, gloo, loopback; issues 15 and 28): the ranks agree on every way a run ends.

- A stop signal — TERM, INT, USR1 or USR2, to torchrun or to one rank — stops every rank after one checkpoint, with
  the same status on every rank, no worker outliving torchrun, and torchrun's restarts (``--max-restarts=2``, the
  Slurm script's default) not undoing it. torchrun is started as ``scripts/slurm/train.sbatch`` starts it
  (``PET_SIGNALS_TO_HANDLE`` adds SIGUSR1 and SIGUSR2 to the signals it forwards); a torchrun without that, which
  SIGUSR1 kills at once, leaves workers that stop by the parent-death signal. CI runs one case of each mechanism
  (the launcher forwarding, one rank voting with one restart, the launcher dying); the whole 4 x 2 matrix, with
  two restarts, is marked ``slow``.
- A rank that freezes: the survivor's collective times out and it ends with one line naming the rank behind and
  the last step that rank finished.
- Bad input found at start, and a data stream with no usable sample: exit 2 on every rank, one line said once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from genlip_fast.checkpoint import list_checkpoints, verify_checkpoint
from tiny_run import recap_layout_shard, tiny_estimate, tiny_overrides

REPO = Path(__file__).resolve().parent.parent
RECIPE = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"}  # as scripts/slurm/train.sbatch

WRAPPER = """
import os, signal, sys
from pathlib import Path
import genlip_fast.train.trainer as trainer
from genlip_fast.train.__main__ import main

attempt, rank = os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["RANK"]
Path(f"pid_{attempt}_{rank}").write_text(str(os.getpid()))
if attempt == "0" and rank == os.environ.get("FREEZE_RANK"):  # this rank stops dead (SIGSTOP) as step 2 begins
    real = trainer.warmup_cosine

    def frozen(step, **kw):
        if step == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(step, **kw)

    trainer.warmup_cosine = frozen
if rank == os.environ.get("SLOW_EXIT_RANK"):  # this rank leaves 2 s after the other: torchrun, which polls its
    import time                                # workers every 0.1 s, SIGTERMs it while it is still leaving

    import genlip_fast.train.distributed as distributed
    real_destroy = distributed.destroy_process_group

    def slow_destroy():
        time.sleep(2)
        real_destroy()

    distributed.destroy_process_group = slow_destroy
rc = main(sys.argv[1:])
Path(f"rc_{attempt}_{rank}").write_text(str(rc))
sys.exit(rc)
"""


@contextlib.contextmanager
def _torchrun(tmp_path: Path, args: list[str], *, max_restarts: int = 0, **env):
    """torchrun with 2 workers running WRAPPER; on the way out, whatever it started that still runs is ended (the
    workers run in their own sessions, so by the pids they wrote)."""
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "TRITON_INTERPRET": "0",
           "OMP_NUM_THREADS": "1", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", str(script), "--no-progress", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in _worker_pids(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _worker_pids(tmp_path: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(tmp_path.glob("pid_*"))]


def _alive(pids: list[int]) -> list[int]:
    def running(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in pids if running(p)]


def _exit_codes(tmp_path: Path, attempt: int) -> list[int]:
    return [int((tmp_path / f"rc_{attempt}_{r}").read_text()) for r in range(2)]


def _wait_for_steps(proc, metrics: Path, n: int, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.2)


def _one_stop_checkpoint(out: Path, shapes: Path) -> None:
    """The stop's checkpoint is the run's only one: after the last step logged, from both ranks, passing its check
    (so no restarted attempt trained on), and within the start-up check's estimate for 2 ranks."""
    root = out / "checkpoints"
    rows = len((out / "metrics.jsonl").read_text().splitlines())
    assert [p.name for p in list_checkpoints(root)] == [f"step_{rows:08d}"] and rows >= 2
    folder = root / f"step_{rows:08d}"
    assert verify_checkpoint(folder) == []
    assert {"rank_00000.pt", "rank_00001.pt"} <= set(os.listdir(folder))
    real = sum(f.stat().st_size for f in folder.iterdir())
    assert real < tiny_estimate(shapes, 2) < 1.3 * real


SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2}
MATRIX = [pytest.param(name, target, 2, marks=pytest.mark.slow, id=f"{name}-{target}")
          for name in SIGNALS for target in ("torchrun", "rank 1")]
CI = [pytest.param("USR1", "torchrun", 2, id="USR1-torchrun-ci"),  # the Slurm USR1 setup
      pytest.param("TERM", "rank 1", 1, id="TERM-rank 1-ci")]  # one restart (each costs a start): the same rule


@pytest.mark.parametrize("name,target,restarts", CI + MATRIX)
def test_a_stop_signal_to_torchrun_or_one_rank_stops_every_rank_once(shapes, tmp_path, name, target, restarts):
    """Before: SIGUSR1 killed torchrun and orphaned the workers (D1); a signal to one rank gave rank 0 138 and rank 1
    -15 with no restarts, and with --max-restarts=2 torchrun restarted the workers and training went on (D2)."""
    sig, out = SIGNALS[name], tmp_path / "run"
    with _torchrun(tmp_path, tiny_overrides(shapes, out, steps=200, parallel__data_streams=2), max_restarts=restarts,
                   TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120", **RECIPE) as proc:
        _wait_for_steps(proc, out / "metrics.jsonl", 2)
        os.kill(proc.pid if target == "torchrun" else _worker_pids(tmp_path)[1], sig)  # pid_0_1: rank 1
        log = proc.communicate(timeout=240)[0]
        alive = _alive(_worker_pids(tmp_path))
    code = 128 + sig
    assert _exit_codes(tmp_path, 0) == [code, code], log[-4000:]
    assert not alive and "forcefully exiting" not in log, log[-4000:]  # no worker outlived torchrun, none killed
    _one_stop_checkpoint(out, shapes)
    restarted = sorted(tmp_path.glob("rc_[1-9]_*"))
    if target == "torchrun":  # torchrun itself was stopped: it restarts nothing
        assert not restarted, log[-4000:]
    else:  # torchrun restarts the workers that exited non-zero; they end at once with the stop's status
        assert len(restarted) == 2 * restarts and {int(p.read_text()) for p in restarted} == {code}, log[-4000:]
        assert log.count("genlip-train: stopped: a stop signal ended this run") == restarts, log[-4000:]


def test_workers_whose_torchrun_dies_stop_with_a_checkpoint(shapes, tmp_path):
    """A torchrun started without PET_SIGNALS_TO_HANDLE dies of SIGUSR1 at once; its workers get the parent-death
    signal (SIGTERM), finish their step, save and exit 143 instead of training on unsupervised (D1)."""
    out = tmp_path / "run"
    with _torchrun(tmp_path, tiny_overrides(shapes, out, steps=200, parallel__data_streams=2),
                   TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120") as proc:
        _wait_for_steps(proc, out / "metrics.jsonl", 2)
        proc.send_signal(signal.SIGUSR1)
        log = proc.communicate(timeout=60)[0]
        assert proc.returncode == -signal.SIGUSR1, log[-4000:]
        deadline = time.monotonic() + 120
        while _alive(_worker_pids(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(_worker_pids(tmp_path))
    assert _exit_codes(tmp_path, 0) == [143, 143]
    _one_stop_checkpoint(out, shapes)


def test_a_frozen_rank_is_named_in_one_line_with_the_last_step_it_finished(shapes, tmp_path):
    """Rank 1 freezes (SIGSTOP) as step 2 begins; rank 0 waits in step 2's first collective, logs at 90% of the
    timeout that rank 1 is behind, and ends at the timeout with one line naming it and the last step it finished.
    Before: a ~60-line gloo traceback after the default 600 s, and a watch line that said rank 1 was at "#0 (start)"
    though it had finished step 1. (The 6 s timeout leaves room for ranks that start seconds apart here.)"""
    with _torchrun(tmp_path, tiny_overrides(shapes, tmp_path / "run", steps=4, parallel__collective_timeout_s=6),
                   FREEZE_RANK="1") as proc:
        deadline = time.monotonic() + 240
        while not (tmp_path / "rc_0_0").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(_worker_pids(tmp_path)[1], signal.SIGKILL)  # torchrun would wait 30 s before it kills the frozen rank
        log = proc.communicate(timeout=120)[0]
    assert (tmp_path / "rc_0_0").read_text() == "1" and not (tmp_path / "rc_0_1").exists(), log[-4000:]
    lines = [line for line in log.splitlines() if "genlip-train:" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "genlip-train: error: rank 0: a collective timed out after parallel.collective_timeout_s = 6 s; rank 1 is "
        "behind: it last finished step 1 and entered sync point #"), log[-4000:]
    assert "rank 0 waits in sync point" in lines[0], log[-4000:]
    assert "genlip_fast/" not in log, log[-4000:]  # no traceback of ours (torchrun prints its own ChildFailedError)
    assert "no progress for" in log and "rank 1 is behind: it last finished step 1" in log  # the watch, at 90%
    assert "the run ended with this error on rank 0" in (tmp_path / "run" / "logs" / "rank0.log").read_text()


def test_bad_input_under_torchrun_exits_2_on_every_rank(shapes, tmp_path):
    """Rank 1 is slow to leave: torchrun's SIGTERM, sent when rank 0 exits 2, must not turn its status into -15."""
    with _torchrun(tmp_path, tiny_overrides(shapes, tmp_path / "run", steps=2,
                                            data__val_shards=str(tmp_path / "nowhere" / "val-*.tar")),
                   SLOW_EXIT_RANK="1") as proc:
        log = proc.communicate(timeout=240)[0]
    assert _exit_codes(tmp_path, 0) == [2, 2], log[-4000:]
    assert log.count("genlip-train: config error: data.val_shards") == 1, log[-4000:]


def test_a_stream_with_no_usable_sample_stops_every_rank_with_one_line(shapes, tmp_path):
    """Rank 1's stream is dealt the unusable shard in epoch 0 (seed 0, one open shard per stream): it pads its
    micro-steps and votes, so rank 0 — which has samples — stops too, and both exit 2 with one line said once.
    Before: rank 1 hung in its data wait and rank 0 in the step's collectives."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(shapes / "train-000000.tar", data / "s-000000.tar")
    recap_layout_shard(data / "s-000001.tar", 6)
    with _torchrun(tmp_path, tiny_overrides(shapes, tmp_path / "run", steps=4, parallel__data_streams=2,
                                            data__shuffle_shards=1, data__train_shards=str(data))) as proc:
        log = proc.communicate(timeout=240)[0]
    assert _exit_codes(tmp_path, 0) == [2, 2], log[-4000:]
    lines = [line for line in log.splitlines() if "genlip-train:" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "genlip-train: data error: rank 1: data.train_shards: no usable sample in a whole pass over data stream 1 "
        f"of 2: 1 shard of 6 samples ({data / 's-000001.tar'}), "), log[-4000:]
