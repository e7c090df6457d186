"""HSDP on a 2-D mesh (gloo, CPU, tiny model), in as few process launches as the checks allow.

One launch of ``scripts/slurm/train.sbatch`` — two torchrun agents (``--nnodes=2``, 2 ranks each, loopback c10d
rendezvous), started by a stand-in ``srun`` — runs ``tests/hsdp_worker.py``: gradients and the recorded
collectives of 1x4 FSDP, 2x2 HSDP and 4x1 replicas, and one trainer run continued across mesh shapes. The tests
below read what it wrote, and add the single-process legs.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genlip_fast.checkpoint import latest_checkpoint
from genlip_fast.train.config import ConfigError
from genlip_fast.train.distributed import mesh_shape
from genlip_fast.train.trainer import train
from tiny_run import tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "hsdp_worker.py"
STEPS = 8
STREAMS = 4  # four data streams: the same packs on 1 or 4 ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}


FAKE_SRUN = """#!/usr/bin/env bash
# srun on one machine: the command once per node, in parallel, as Slurm starts it on each; SIGTERM and SIGUSR1
# (Slurm's --signal=TERM@N / USR1@N) are passed on to the tasks
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do
  while :; do wait "$p"; r=$?; kill -0 "$p" 2>/dev/null || break; done
  [ "$r" -ne 0 ] && rc=$r
done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done
[ "$1" = requeue ] && echo "requeue $2" >> "$OUT_DIR/../scontrol.log"
exit 0
"""
FAKE_SQUEUE = """#!/usr/bin/env bash
# the job's end time (squeue -h -j ID -o %e)
if [ -n "${FAKE_JOB_END:-}" ]; then date -d "@$FAKE_JOB_END" +%Y-%m-%dT%H:%M:%S; else echo UNLIMITED; fi
"""
SBATCH = REPO / "scripts/slurm/train.sbatch"


def slurm_env(tmp: Path, out_dir: Path, **extra) -> dict:
    """The environment a 2-node Slurm job of 2 GPUs per node would give the script, with stand-in srun, scontrol
    and squeue first on PATH."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("squeue", FAKE_SQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**worker_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "4242", "OUT_DIR": str(out_dir),
            "PYTHON": sys.executable, "GPUS_PER_NODE": "2", "RDZV_PORT": str(free_port()), **extra}


@pytest.fixture(scope="module")
def launched(shapes, tmp_path_factory):
    """``scripts/slurm/train.sbatch`` on two "nodes": a stand-in ``srun`` starts one torchrun agent per node on
    this machine, 2 ranks each, and they meet in the script's c10d rendezvous on the first node."""
    tmp = tmp_path_factory.mktemp("hsdp")
    out_json, run_dir = tmp / "report.json", tmp / "train"
    env = slurm_env(tmp, run_dir, TRAIN_MODULE="hsdp_worker", MAX_RESTARTS="0")
    env["PYTHONPATH"] += f"{os.pathsep}{WORKER.parent}"
    res = subprocess.run(["bash", str(SBATCH), str(out_json), str(shapes)], capture_output=True, text=True, env=env,
                         cwd=tmp, timeout=400)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    return json.loads(out_json.read_text()), run_dir, log


@pytest.fixture(scope="module")
def one_process(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    return train(tiny_config(shapes, out, steps=STEPS, parallel__data_streams=STREAMS), progress=False)["losses"]


MESHES = ["1x4", "2x2", "4x1"]


@pytest.mark.parametrize("mesh", MESHES)
def test_gradients_equal_one_process(launched, mesh):
    """Each mesh's summed gradients equal an unsharded model's on all ranks' samples (fp32, only summation order
    differs: measured ~3e-7 relative)."""
    r = launched[0]["meshes"][mesh]
    assert r["accumulated"]["err_vs_reference"] < 1e-5
    assert r["one_pack"]["err_vs_reference"] < 1e-5


@pytest.mark.parametrize("mesh", MESHES)
def test_three_micro_steps_equal_one_pack(launched, mesh):
    assert launched[0]["meshes"][mesh]["err_accumulated_vs_one_pack"] < 1e-5


@pytest.mark.parametrize("mesh", MESHES)
def test_collectives_are_the_scaling_models(launched, mesh):
    """Every all-gather, reduce-scatter and all-reduce the run issued (op, group size, bytes, calls) is the scaling
    model's, with 3 micro-steps and with 1: nothing is resharded or reduced between micro-steps."""
    r = launched[0]["meshes"][mesh]
    assert r["accumulated"]["measured"] == r["model"]
    assert r["one_pack"]["measured"] == r["model"]
    ops = {op for op, *_ in r["model"]}
    assert ops == {"1x4": {"all_gather", "reduce_scatter"}, "2x2": {"all_gather", "reduce_scatter", "all_reduce"},
                   "4x1": {"all_reduce"}}[mesh]


def test_two_agents_make_a_2x2_mesh_and_training_continues_across_meshes(launched, one_process, shapes, tmp_path):
    report, run_dir, log = launched
    assert report["local_world_size"] == 2
    assert all(code == 0 for code in report["trainer_exit_codes"].values())
    for desc in ("HSDP: 2 replica(s) x 2 shard(s)", "FSDP: 1 replica(s) x 4 shard(s)",
                 "HSDP: 4 replica(s) x 1 shard(s)"):
        assert desc in log
    # the last leg: one process continues the 4-rank run's checkpoint
    out = tmp_path / "train"
    shutil.copytree(run_dir, out)
    last = train(tiny_config(shapes, out, steps=STEPS, parallel__data_streams=STREAMS), progress=False)
    assert len(last["losses"]) == 2
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # 2x2 (steps 1-2) -> 1x4 (3-4) -> 4x1 (5-6) -> 1 process (7-8) == one process throughout
    torch.testing.assert_close(torch.tensor([r["loss"] for r in rows]), torch.tensor(one_process), rtol=1e-5, atol=0)


def test_mesh_shape_defaults_and_errors():
    assert mesh_shape(1) == (1, 1)
    assert mesh_shape(16, local_world_size=8) == (2, 8)  # shard in a node, replicate across nodes
    assert mesh_shape(4, local_world_size=4) == (1, 4)  # one node: plain FSDP
    assert mesh_shape(16, replicate=1, local_world_size=8) == (1, 16)
    assert mesh_shape(16, replicate=4, local_world_size=8) == (4, 4)
    assert mesh_shape(16, shard=2, local_world_size=8) == (8, 2)
    with pytest.raises(ConfigError, match=r"replicate \(3\) x parallel.shard \(4\) must equal the world size 16"):
        mesh_shape(16, replicate=3, shard=4)
    with pytest.raises(ConfigError, match=r"parallel.replicate \(3\) x parallel.shard \(\?\)"):
        mesh_shape(16, replicate=3)
    with pytest.raises(ConfigError, match="not a whole number of nodes of 3"):
        mesh_shape(16, local_world_size=3)


def test_a_mesh_that_does_not_fit_is_a_config_error(shapes, tmp_path, capsys):
    from genlip_fast.train.__main__ import main

    over = tiny_overrides(shapes, tmp_path / "run", steps=1, parallel__replicate=2)
    assert main(["--no-progress", *over]) == 2
    assert "parallel.replicate (2) x parallel.shard (?) must equal the world size 1" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not torch.distributed.is_initialized()  # no process group left behind


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_slurm_time_limit_checkpoints_and_requeues(shapes, tmp_path, sig):
    """The script's time-limit path, in its TERM and its USR1 setup: Slurm's signal to the step (here: to the
    stand-in srun, which passes it to the torchrun agents as Slurm would) -> every worker finishes its step and
    saves -> with under 330 s left, the job requeues itself."""
    out = tmp_path / "run"
    over = [o for o in tiny_overrides(shapes, out, steps=10_000) if not o.startswith("--train.out_dir")]
    env = slurm_env(tmp_path, out, FAKE_JOB_END=str(int(time.time()) + 200))
    job = subprocess.Popen(["bash", str(SBATCH), *over], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.5)
    srun = subprocess.run(["pgrep", "-P", str(job.pid), "-f", "srun"], capture_output=True, text=True).stdout.split()
    os.kill(int(srun[0]), sig)
    log = job.communicate(timeout=300)[0]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n", log[-3000:]
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert latest_checkpoint(out / "checkpoints").name == f"step_{steps[-1]:08d}"
    assert "stopped after step" in log and steps[-1] < 10_000
