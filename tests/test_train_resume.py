"""Checkpoints and faults, in one process on CPU: exact resume, interrupted saves, NaN steps, stage-2 init, export."""

import json

import pytest
import torch

import genlip_fast.train.checkpoint as ckpt_mod
import genlip_fast.train.trainer as trainer_mod
from genlip_fast.checkpoint import export, latest_checkpoint, list_checkpoints, load_checkpoint_model, load_exported
from genlip_fast.train.trainer import NonFiniteLossError, train
from tiny_run import tiny_config


@pytest.fixture(scope="module")
def straight(shapes, tmp_path_factory):
    """6 steps in one go, checkpoint at the end."""
    out = tmp_path_factory.mktemp("straight")
    res = train(tiny_config(shapes, out, steps=6), progress=False)
    return out, res["losses"]


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def assert_same_weights(a, b):
    ma, _ = load_checkpoint_model(a)
    mb, _ = load_checkpoint_model(b)
    for (na, ta), (nb, tb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na


def test_stop_and_resume_is_exact(shapes, straight, tmp_path):
    out, losses = straight
    first = train(tiny_config(shapes, tmp_path, steps=6, train__stop_at_step=3), progress=False)
    assert first["stopped_by"] == "stop_at_step" and len(first["losses"]) == 3
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003"
    second = train(tiny_config(shapes, tmp_path, steps=6), progress=False)
    assert first["losses"] + second["losses"] == losses  # bitwise: same data, RNG, optimizer and schedule
    assert [r["loss"] for r in metrics(tmp_path)] == losses  # the metrics file continues across the restart
    assert_same_weights(out / "checkpoints", tmp_path / "checkpoints")


def test_interrupted_save_keeps_the_last_good_checkpoint(shapes, straight, tmp_path, monkeypatch):
    out, losses = straight
    real_save = ckpt_mod.dcp.save

    def crash_mid_save(state, *, checkpoint_id, **kw):
        real_save(state, checkpoint_id=checkpoint_id, **kw)  # shards written, meta.json and rename not yet
        if str(checkpoint_id).endswith("step_00000004.tmp"):
            raise RuntimeError("simulated crash during save")

    monkeypatch.setattr(ckpt_mod.dcp, "save", crash_mid_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(shapes, tmp_path, steps=6, checkpoint__every=2), progress=False)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert (root / "step_00000004.tmp").is_dir()  # the half-written save is there ...
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002"]  # ... but never taken for a checkpoint
    assert latest_checkpoint(root).name == "step_00000002"
    resumed = train(tiny_config(shapes, tmp_path, steps=6, checkpoint__every=2), progress=False)
    assert resumed["losses"] == losses[2:]
    assert not (root / "step_00000004.tmp").exists()  # cleaned by the next save
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert_same_weights(out / "checkpoints", root)


def poison(monkeypatch, bad_packs: set[int]):
    """Make the given packs (0-based, one per step here) carry NaN pixels."""
    real = trainer_mod.build_data_loader

    class Poisoned:
        def __init__(self, loader):
            self.loader, self.i = loader, 0

        def __next__(self):
            b = next(self.loader)
            if self.i in bad_packs:
                b.patches = torch.full_like(b.patches, float("nan"))
            self.i += 1
            return b

        def __getattr__(self, name):
            return getattr(self.loader, name)

    monkeypatch.setattr(trainer_mod, "build_data_loader", lambda *a, **k: Poisoned(real(*a, **k)))


def test_nan_step_is_skipped(shapes, tmp_path, monkeypatch):
    poison(monkeypatch, {2})
    res = train(tiny_config(shapes, tmp_path, steps=4, checkpoint__every=1, checkpoint__keep=10), progress=False)
    rows = metrics(tmp_path)
    assert [r["skipped"] for r in rows] == [False, False, True, False]
    assert res["losses"][2] != res["losses"][2] and all(x == x for i, x in enumerate(res["losses"]) if i != 2)
    root = tmp_path / "checkpoints"
    assert_same_weights(root / "step_00000002", root / "step_00000003")  # no update on the NaN step
    m3, _ = load_checkpoint_model(root / "step_00000003")
    m4, _ = load_checkpoint_model(root / "step_00000004")
    assert all(torch.isfinite(p).all() for p in m4.parameters())
    assert not torch.equal(m3.blocks[0].attn.q_proj.weight, m4.blocks[0].attn.q_proj.weight)


def test_too_many_nan_steps_stop_with_a_clear_error(shapes, tmp_path, monkeypatch):
    poison(monkeypatch, {1, 2, 3})
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        train(tiny_config(shapes, tmp_path, steps=6, train__max_bad_steps=3), progress=False)


def test_stage2_init_and_export(shapes, straight, tmp_path):
    out, _ = straight
    res = train(tiny_config(shapes, tmp_path / "s2", steps=2, checkpoint__init_from=str(out), optim__lr=1e-4),
                progress=False)
    rows = metrics(tmp_path / "s2")
    assert [r["step"] for r in rows] == [1, 2]  # fresh schedule and step count
    s1_model, _ = load_checkpoint_model(out)
    s1 = tiny_config(shapes, tmp_path / "fresh", steps=1)
    fresh = train(s1, progress=False)
    # starting from stage-1 weights gives a much lower first loss than a fresh model
    assert res["losses"][0] < fresh["losses"][0] - 0.1

    dst = tmp_path / "enc.safetensors"
    summary = export(out, dst, vision_only=True)
    enc = load_exported(dst)
    assert summary["step"] == 6
    assert torch.equal(enc.blocks[1].mlp.w2.weight, s1_model.blocks[1].mlp.w2.weight)
    assert torch.equal(enc.patch_embed.weight, s1_model.patch_embed.weight)
    from safetensors import safe_open

    with safe_open(str(dst), framework="pt") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())


def test_sigterm_saves_and_resumes_exactly(shapes, straight, tmp_path, monkeypatch):
    import os
    import signal

    _, losses = straight
    real = trainer_mod.build_data_loader

    class Preempted:
        """SIGTERM arrives while the third step's data is being read."""

        def __init__(self, loader):
            self.loader, self.i = loader, 0

        def __next__(self):
            if self.i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            self.i += 1
            return next(self.loader)

        def __getattr__(self, name):
            return getattr(self.loader, name)

    monkeypatch.setattr(trainer_mod, "build_data_loader", lambda *a, **k: Preempted(real(*a, **k)))
    first = train(tiny_config(shapes, tmp_path, steps=6), progress=False)
    monkeypatch.undo()
    assert first["stopped_by"] == "signal" and first["signal"] == signal.SIGTERM
    assert len(first["losses"]) == 3  # the step in flight finishes, then a checkpoint
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003"
    second = train(tiny_config(shapes, tmp_path, steps=6), progress=False)
    assert first["losses"] + second["losses"] == losses


@pytest.mark.parametrize("mode", ["full", "ratio"])
def test_activation_checkpointing_does_not_change_training(shapes, straight, tmp_path, mode):
    _, losses = straight
    from genlip_fast.train.distributed import blocks_to_checkpoint

    assert blocks_to_checkpoint(4, "ratio", 0.5) == [1, 3] and blocks_to_checkpoint(4, "full") == [0, 1, 2, 3]
    res = train(tiny_config(shapes, tmp_path, steps=6, train__stop_at_step=3, parallel__activation_checkpoint=mode),
                progress=False)
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(losses[:3]), rtol=1e-6, atol=0)

