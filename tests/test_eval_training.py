"""Evaluation during training (issue 17): it never changes training, a resumed run evaluates exactly like an
uninterrupted one, two ranks share the validation loss (global token mean), the figures reach the JSONL, the
progress bar and TensorBoard, and the probe command agrees with the trainer's probe."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genlip_fast.checkpoint import load_checkpoint_model
from genlip_fast.data.synthetic import generate_probe_set
from genlip_fast.data.tokenizer import load_tokenizer
from genlip_fast.eval.__main__ import main as eval_main
from genlip_fast.train.config import ConfigError, load_config
from genlip_fast.train.metrics import MetricsLogger
from genlip_fast.train.trainer import train
from tiny_run import make_shapes, tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parent.parent
STEPS = 4
EVAL_KEYS = {"val_loss", "val_loss_tokens", "val_bleu4", "val_cider", "val_exact_match", "probe_top1",
             "probe_train_top1", "eval_time_s"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shapes shards with 24 held-out images (3+ packs of 256 tokens) and a small probe set beside them."""
    root = make_shapes(tmp_path_factory.mktemp("eval_shapes"), num_val=24)
    generate_probe_set(root / "probe", num_train=24, num_val=12, size=64)
    return root


def with_eval(data: Path, **kw) -> dict:
    # 3 held-out packs; on 2 ranks, rank 1 holds one real pack and one zero-weight slot. Drop path on, so training
    # draws random numbers every step: an evaluation that moved the generators would change the losses.
    return {"steps": STEPS, "model__drop_path": 0.1, "data__val_shards": f"{data}/val-*.tar", "eval__every": 2,
            "eval__packs": 3, "eval__captions": 2, "eval__probe_train": "demo", "eval__probe_val": "demo",
            "train__max_new_tokens": 6, **kw}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    off_dir, on_dir = tmp_path_factory.mktemp("eval_off"), tmp_path_factory.mktemp("eval_on")
    off = train(tiny_config(data, off_dir, steps=STEPS, model__drop_path=0.1), progress=False)
    on = train(tiny_config(data, on_dir, **with_eval(data)), progress=False)
    return off_dir, off, on_dir, on


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def without_time(evals: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "eval_time_s"} for e in evals]


def test_evaluation_does_not_change_training(runs):
    off_dir, off, on_dir, on = runs
    assert on["losses"] == off["losses"]  # bitwise: same data, RNG, optimizer
    m_off, _ = load_checkpoint_model(off_dir)
    m_on, _ = load_checkpoint_model(on_dir)
    for (n, a), (_, b) in zip(m_off.state_dict().items(), m_on.state_dict().items()):
        assert torch.equal(a, b), n
    assert [e["step"] for e in on["evals"]] == [0, 2, 4]  # the untrained model, every 2 steps
    for e in on["evals"]:
        assert set(e) == EVAL_KEYS | {"step"}
        assert math_ok(e["val_loss"]) and e["val_loss_tokens"] > 0 and 0 <= e["probe_top1"] <= 1
    # the metrics rows carry the figures on evaluated steps only (step 0: a row of its own), and say nothing of
    # evaluation with it off
    got = rows(on_dir)
    assert [(r["step"], "loss" in r, "val_loss" in r) for r in got] == \
        [(0, False, True), (1, True, False), (2, True, True), (3, True, False), (4, True, True)]
    assert without_time([{"step": r["step"], **{k: r[k] for k in EVAL_KEYS & set(r)}} for r in got if "val_loss" in r]) \
        == without_time(on["evals"])
    assert not any(EVAL_KEYS & set(r) for r in rows(off_dir))
    assert on["evals"][2]["val_loss"] < on["evals"][1]["val_loss"] < on["evals"][0]["val_loss"]


def math_ok(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def test_resumed_run_evaluates_like_an_uninterrupted_one(data, runs, tmp_path):
    _, _, _, on = runs
    first = train(tiny_config(data, tmp_path, **with_eval(data, train__stop_at_step=3)), progress=False)
    second = train(tiny_config(data, tmp_path, **with_eval(data)), progress=False)
    assert first["losses"] + second["losses"] == on["losses"]
    assert without_time(first["evals"] + second["evals"]) == without_time(on["evals"])
    assert [r["step"] for r in rows(tmp_path) if "val_loss" in r] == [0, 2, 4]  # the JSONL goes on after a restart


def test_two_ranks_share_the_validation_loss(data, tmp_path):
    from types import SimpleNamespace

    from genlip_fast.train.evaluate import Evaluator

    out = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    args = tiny_overrides(data, out, **with_eval(data, steps=2, parallel__data_streams=2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "genlip_fast.train", "--no-progress", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    (got,) = [r for r in rows(out) if r["step"] == 2 and "val_loss" in r]
    # the same weights evaluated by one process: every held-out pack counted once, the same token mean
    model, meta = load_checkpoint_model(out)
    assert meta["world_size"] == 2 and meta["step"] == 2
    cfg = tiny_config(data, tmp_path / "one", **with_eval(data))
    one = Evaluator(cfg, load_tokenizer("demo"), SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")))
    ref = one(2, model)
    assert got["val_loss_tokens"] == ref["val_loss_tokens"]
    assert got["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6)
    assert got["probe_top1"] == ref["probe_top1"]


def test_probe_command_agrees_with_the_trainers_probe(data, runs, capsys, tmp_path):
    _, _, on_dir, on = runs
    probe = data / "probe"
    rc = eval_main(["probe", "--checkpoint", str(on_dir), "--train", str(probe / "train"), "--val",
                    str(probe / "val"), "--json", "--attn-backend", "reference"])  # as the run (not the interpreter)
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["top1"] == on["evals"][-1]["probe_top1"] and res["classes"] == 4 and res["val_images"] == 12
    rc = eval_main(["probe", "--checkpoint", str(on_dir), "--train", str(data / "nowhere"), "--val",
                    str(probe / "val")])
    assert rc == 2 and str(data / "nowhere") in capsys.readouterr().err
    # a damaged checkpoint is one line naming it, not a traceback
    bad = tmp_path / "damaged"
    shutil.copytree(next((on_dir / "checkpoints").glob("step_*")), bad)
    shard = next(bad.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    rc = eval_main(["probe", "--checkpoint", str(bad), "--train", str(probe / "train"), "--val", str(probe / "val")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("genlip-eval:") and "Traceback" not in err


def test_held_out_samples_come_through_the_training_reader_and_skip_bad_input(data, tmp_path, caplog):
    """Captions read held-out data sample by sample through the training pipeline (one reader): the samples the
    held-out packs hold, a bad record and a bad shard skipped and counted as in training."""
    import logging

    from genlip_fast.data.webdataset import iter_shard, write_shard
    from genlip_fast.train.evaluate import held_out_packs, held_out_samples

    val = tmp_path / "val"
    val.mkdir()
    shutil.copy(data / "val-000000.tar", val)
    good = next(iter_shard(data / "val-000000.tar"))
    write_shard(val / "val-000001.tar", [("bad", {"jpg": b"not an image", "txt": b"a cross ."}),
                                         ("good", good[1])])
    (val / "val-000002.tar").write_text("not a tar")
    cfg = tiny_config(data, tmp_path / "out", data__val_shards=f"{val}/val-*.tar")
    tok = load_tokenizer("demo")
    with caplog.at_level(logging.WARNING):
        samples = held_out_samples(cfg, tok, 100)
    assert len(samples) == 25 and len({s.key for s in samples}) == 25
    assert "skipped 1 bad samples {'not an image': 1} and 1 unreadable shards" in caplog.text
    assert "val-000002.tar" in caplog.text
    packs = held_out_packs(cfg, tok, 100)
    assert [s.key for s in samples] == [k for p in packs for k in p.keys]  # greedy packing keeps the order
    assert [s.key for s in held_out_samples(cfg, tok, 3)] == [s.key for s in samples[:3]]  # a fixed order


def test_eval_options_are_checked(data, tmp_path):
    with pytest.raises(ConfigError, match="eval.every"):
        load_config("tiny", ["--eval.every=-1"])
    with pytest.raises(ConfigError, match="probe_val"):
        load_config("tiny", ["--eval.probe_train=x", "--eval.probe_val="])
    with pytest.raises(ConfigError, match="nowhere"):
        train(tiny_config(data, tmp_path, **with_eval(data, eval__probe_train=str(tmp_path / "nowhere"))),
              progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the first step


def test_progress_bar_and_tensorboard_show_the_evaluation(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    step_row = {"loss": 2.0, "lr": 1e-3, "tokens_per_s": 1e3, "samples_per_s": 10.0, "mfu": None,
                "peak_mem_gib": None, "data_wait_s": 0.0}
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=3, progress=True, tensorboard=True)
    logger.log({"step": 0, "val_loss": 3.5})  # before the first step: a row, no bar tick
    assert logger._bar.n == 0 and "val=3.5000" not in str(logger._bar.postfix)
    logger.log({"step": 1, **step_row})
    assert "val=3.5000" in logger._bar.postfix
    logger.log({"step": 2, **step_row, "val_loss": 1.25, "probe_top1": 0.5, "eval_time_s": 0.1})
    logger.log({"step": 3, **step_row})
    assert "val=1.2500" in logger._bar.postfix and "probe=50.0%" in logger._bar.postfix  # kept after the eval
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/val_loss", "eval/probe_top1", "train/loss"} <= tags and "train/val_loss" not in tags
    # a resumed run shows the last evaluation before it makes one of its own
    again = MetricsLogger(tmp_path, enabled=True, total_steps=3, start_step=2, progress=False, tensorboard=False)
    assert again._last_eval == {"val": "1.2500", "probe": "50.0%"}
    again.close()
