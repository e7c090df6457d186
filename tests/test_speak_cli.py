"""The command lines on a checkpoint written by the real trainer: captions, the patch readout (PNG + JSON), the
authors'-layout conversion both ways (bit-identical), and genlip_fast.load_encoder."""

import json
import random

import numpy as np
import pytest
import torch

import genlip_fast
from genlip_fast.checkpoint import load_checkpoint_model, load_model
from genlip_fast.convert import main as convert_main
from genlip_fast.data.synthetic import render
from genlip_fast.speak.__main__ import main as speak_main
from genlip_fast.train.trainer import train
from tiny_run import tiny_config

REF = ["--attn-backend", "reference"]  # the tests run Triton in its (slow) interpreter; "auto" would pick it


@pytest.fixture(scope="module")
def run_dir(shapes, tmp_path_factory):
    """A tiny run of 3 steps with the trainer's own save path (the demo's checkpoint, shorter)."""
    out = tmp_path_factory.mktemp("speak_run")
    train(tiny_config(shapes, out, steps=3), progress=False)
    return out


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("speak_images")
    paths = []
    for i, size in enumerate([64, 96]):  # 4x4 and 6x6 patches
        im, _ = render(random.Random(i), size=size)
        paths.append(root / f"shape{i}.png")
        im.save(paths[-1])
    return paths


def test_caption_cli_prints_one_caption_per_image(run_dir, image_files, capsys):
    assert speak_main([*map(str, image_files), "--checkpoint", str(run_dir), "--max-new-tokens", "5", *REF]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(p) for p in image_files]
    assert all(len(line.split(": ", 1)[1].split()) >= 1 for line in lines)
    # the same captions as the recompute oracle on the same patches
    model, inputs = load_model(run_dir)
    model.set_backends(attn="reference")
    from genlip_fast.data.tokenizer import load_tokenizer

    tok = load_tokenizer(inputs.tokenizer)
    decoded = inputs.image.decode([p.read_bytes() for p in image_files])
    assert [g for _, g in decoded] == [(4, 4), (6, 6)]
    want = model.generate([p for p, _ in decoded], [g for _, g in decoded], eot_id=tok.eot_id, max_new_tokens=5)
    assert [line.split(": ", 1)[1] for line in lines] == [tok.decode(ids) for ids in want]
    assert speak_main([str(image_files[0]) + ".missing", "--checkpoint", str(run_dir)]) == 2
    assert "no image file at" in capsys.readouterr().err


def test_readout_writes_png_and_one_json_entry_per_patch(run_dir, image_files, tmp_path):
    from PIL import Image

    out = tmp_path / "ro" / "readout.png"
    assert speak_main(["readout", str(image_files[1]), "--checkpoint", str(run_dir), "--out", str(out),
                       "--top-k", "3", "--cell", "40", *REF]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["grid"] == [6, 6] and len(doc["patches"]) == 36
    assert [(p["row"], p["col"]) for p in doc["patches"]] == [(r, c) for r in range(6) for c in range(6)]
    for p in doc["patches"]:
        probs = [t["prob"] for t in p["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width == 6 * 40 and im.height > 6 * 40  # the legend sits below the grid


def test_official_export_then_import_is_bit_identical(run_dir, tmp_path, image_files, capsys):
    official, imported = tmp_path / "official", tmp_path / "imported"
    assert convert_main(["export-official", str(run_dir), str(official), "--max-shard-size", "300KB"]) == 0
    assert (official / "model.safetensors.index.json").is_file()  # small shards: the index path is exercised
    assert convert_main(["import-official", str(official), str(imported)]) == 0
    a, _ = load_checkpoint_model(run_dir)
    b, _ = load_checkpoint_model(imported)
    assert a.cfg.replace(attn_backend="auto", ce_backend="auto") == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # the imported checkpoint starts a run (checkpoint.init_from) and speaks like the original
    from genlip_fast.model import GenLIP
    from genlip_fast.train.checkpoint import load_model_weights

    fresh = GenLIP(b.cfg)
    load_model_weights(imported, fresh)
    assert all(torch.equal(fresh.state_dict()[k], sa[k]) for k in sa)
    capsys.readouterr()
    for ckpt in (run_dir, imported):
        speak_main([str(image_files[0]), "--checkpoint", str(ckpt), "--max-new-tokens", "4", *REF])
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first == second
    assert convert_main(["import-official", str(official), str(imported)]) == 2  # never over a checkpoint
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_load_encoder_features_for_every_input_kind(run_dir, image_files):
    from PIL import Image

    enc = genlip_fast.load_encoder(run_dir, dtype=torch.float32, device="cpu", attn_backend="reference")
    model, inputs = load_model(run_dir)
    model.set_backends(attn="reference")
    pil = Image.open(image_files[1]).convert("RGB")
    arr = np.asarray(Image.open(image_files[0]).convert("RGB").resize((100, 40)))  # 2.5:1 -> a wide grid
    pre, grid = inputs.image(pil)
    feats = enc([pil, arr])
    assert [tuple(f.shape) for f in feats] == [(36, enc.dim), (inputs.image.grid(40, 100)[0] *
                                                                inputs.image.grid(40, 100)[1], enc.dim)]
    assert inputs.image.grid(40, 100)[1] > inputs.image.grid(40, 100)[0]
    torch.testing.assert_close(enc([pre], grid_hw=[grid])[0], feats[0])
    # the same numbers as the full model's encoder mode
    from genlip_fast.data.packing import pack_images

    want = model.encode(pack_images([pre, inputs.image(arr)[0]], [grid, inputs.image.grid(40, 100)]))
    for f, w in zip(feats, want):
        torch.testing.assert_close(f, w, atol=1e-5, rtol=1e-5)
    assert enc.model.lm_head is None and enc.model.text_embed is None  # the text side is dropped
    sq = genlip_fast.load_encoder(run_dir, image_size=32, attn_backend="reference")
    assert [tuple(f.shape) for f in sq([pil, arr])] == [(4, enc.dim), (4, enc.dim)]  # stage-1 crop: 2x2 patches


def test_readme_encoder_example_runs_as_written(run_dir, capsys):
    """The README's encoder + projector block, on this run instead of runs/tiny; it prints what its comment says."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(import numpy as np, torch, genlip_fast\n.*?)```", readme, re.S).group(1)
    assert 'genlip_fast.load_encoder("runs/tiny")' in block
    exec(block.replace('genlip_fast.load_encoder("runs/tiny")',
                       f'genlip_fast.load_encoder({str(run_dir)!r}, attn_backend="reference")'), {})
    printed = capsys.readouterr().out.strip()
    assert printed == re.search(r"print\(.*\)\s+# (.*)", block).group(1)


def test_exported_files_caption_and_vision_only_ones_encode(run_dir, image_files, tmp_path, capsys):
    from genlip_fast.checkpoint import export

    full, vision = tmp_path / "full.safetensors", tmp_path / "vision.safetensors"
    export(run_dir, full)
    export(run_dir, vision, vision_only=True)
    capsys.readouterr()
    for ckpt in (run_dir, full):
        assert speak_main([str(image_files[0]), "--checkpoint", str(ckpt), "--max-new-tokens", "4", *REF]) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first == second
    assert speak_main([str(image_files[0]), "--checkpoint", str(vision), *REF]) == 2
    assert "--vision-only export" in capsys.readouterr().err
    a = genlip_fast.load_encoder(vision, attn_backend="reference")([np.zeros((64, 64, 3), np.uint8)])[0]
    b = genlip_fast.load_encoder(run_dir, attn_backend="reference")([np.zeros((64, 64, 3), np.uint8)])[0]
    assert torch.equal(a, b)


def test_features_of_a_run_folder_record_its_checkpoint_and_refuse_a_newer_one(run_dir, image_files, tmp_path,
                                                                              capsys):
    """``features --checkpoint RUN`` reads RUN's latest checkpoint; after training saves another, continuing the
    same output folder is refused instead of mixing the two checkpoints' features."""
    import shutil

    from genlip_fast.checkpoint.format import latest_checkpoint

    images, out = tmp_path / "images", tmp_path / "feats"
    images.mkdir()
    for p in image_files:
        shutil.copy(p, images)
    args = ["features", str(images), "--checkpoint", str(run_dir), "--out", str(out), "--no-progress", *REF]
    assert speak_main(args) == 0
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert json.loads((out / "features.json").read_text())["checkpoint"] == str(latest.resolve())
    newer = latest.with_name("step_99999999")
    shutil.copytree(latest, newer)  # a later save of the same run
    try:
        capsys.readouterr()
        assert speak_main(args) == 2
        assert "another job (checkpoint differ)" in capsys.readouterr().err
    finally:
        shutil.rmtree(newer)
