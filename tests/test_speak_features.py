"""``python -m genlip_fast.speak features``: its files equal genlip_fast.load_encoder at any batch size, a corrupt
image is recorded and skipped, a rerun skips finished shards and redoes a partial one, tar and Parquet shards work as
inputs."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import genlip_fast
from genlip_fast.checkpoint.official import config_to_official, to_official, write_official
from genlip_fast.data.inputs import InputSpec
from genlip_fast.data.webdataset import write_shard
from genlip_fast.model import GenLIP, get_preset
from genlip_fast.speak.__main__ import main as speak_main

SIZES = [(64, 64), (40, 100), (130, 50), (1, 600), (90, 33)]


def png(h, w, seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    torch.manual_seed(0)
    model = GenLIP(get_preset("tiny", n_layers=2, attn_backend="reference", ce_backend="reference")).eval()
    config = {**config_to_official(model.cfg), "genlip_fast_inputs": InputSpec().to_dict()}  # genlip_fast's resize
    write_official(root / "ckpt", config, to_official(model.state_dict(), model.cfg))
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    for i, (h, w) in enumerate(SIZES):
        (folder / ("sub" if i % 2 else "") / f"im{i}.png").write_bytes(png(h, w, i))
    (folder / "im9_bad.jpg").write_bytes(png(20, 20, 9)[:60])  # truncated
    (folder / "notes.txt").write_text("not an image, not listed")
    encoder = genlip_fast.load_encoder(root / "ckpt", attn_backend="reference")
    return root, folder, encoder


def run(*args):
    return speak_main(["features", *map(str, args), "--attn-backend", "reference", "--no-progress"])


def read_out(out, n_shards, ext="jsonl"):
    from safetensors.torch import load_file

    feats, patches, rows = [], [], []
    for j in range(n_shards):
        feats.append(np.load(out / f"features-{j:05d}.npy"))
        if (out / f"patches-{j:05d}.safetensors").is_file():
            patches.append(load_file(out / f"patches-{j:05d}.safetensors"))
        if ext == "jsonl":
            rows += [json.loads(line) for line in (out / f"meta-{j:05d}.jsonl").read_text().splitlines()]
        else:
            import pyarrow.parquet as pq

            rows += pq.read_table(out / f"meta-{j:05d}.parquet").to_pylist()
    return np.concatenate(feats), patches, rows


def test_features_equal_load_encoder_at_any_batch_size(setup, tmp_path):
    root, folder, enc = setup
    for bs in (1, 4):
        assert run(folder, "--checkpoint", root / "ckpt", "--out", tmp_path / f"b{bs}", "--batch-size", bs,
                   "--shard-size", 3, "--patches") == 0
    f1, p1, rows = read_out(tmp_path / "b1", 2)
    f4, p4, rows4 = read_out(tmp_path / "b4", 2)
    assert rows == rows4
    assert [r["source"] for r in rows] == ["im0.png", "im2.png", "im4.png", "im9_bad.jpg", "sub/im1.png",
                                           "sub/im3.png"]
    bad = rows[3]
    assert bad["row"] is None and bad["grid"] is None and "ValueError" in bad["error"]
    good = [r for r in rows if r["error"] is None]
    images = [Image.open(folder / r["source"]) for r in good]
    with torch.no_grad():
        want = enc.encode(images)
    assert [r["grid"] for r in good] == [list(enc.transform.grid(im.height, im.width)) for im in images]
    assert [(r["height"], r["width"]) for r in good] == [(im.height, im.width) for im in images]
    assert f1.dtype == np.float32 and f1.shape == (5, enc.dim)
    np.testing.assert_allclose(f1, want.pooled.numpy(), atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(f4, f1, atol=2e-6, rtol=1e-5)  # batch size does not matter (to rounding)
    # patch features: flat rows, offsets and grids per output shard
    flat = torch.cat([p["features"] for p in p1])
    torch.testing.assert_close(flat, torch.cat(want.patches), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(flat, torch.cat([p["features"] for p in p4]), atol=2e-6, rtol=1e-5)
    grids = [r["grid"] for r in rows[:3]]  # output shard 0: three good images
    assert p1[0]["grids"].tolist() == grids
    assert p1[0]["offsets"].tolist() == np.cumsum([0] + [h * w for h, w in grids]).tolist()


def test_rerun_skips_finished_shards_and_redoes_a_partial_one(setup, tmp_path, capsys):
    root, folder, _ = setup
    out = tmp_path / "out"
    args = [folder, "--checkpoint", root / "ckpt", "--out", out, "--shard-size", 2]
    assert run(*args) == 0
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*-0000[02].*")}
    (out / "meta-00001.jsonl").unlink()  # shard 1 interrupted before its metadata was renamed into place
    (out / ".tmp-features-00001.npy").write_bytes(b"partial")
    capsys.readouterr()
    assert run(*args) == 0
    assert "1 shard(s) written, 2 complete already" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-0000[02].*")} == done
    assert (out / "meta-00001.jsonl").is_file() and not list(out.glob(".tmp-*"))
    assert run(*args, "--layer", "-1") == 2  # another job into the same folder
    assert "layer" in capsys.readouterr().err


def test_shards_as_input_with_a_layer_and_parquet_metadata(setup, tmp_path):
    root, _, enc = setup
    samples = [(f"k{i}", {"png": png(h, w, 20 + i), "txt": b"a caption"}) for i, (h, w) in enumerate(SIZES[:3])]
    samples.insert(1, ("broken", {"jpg": b"\xff\xd8\xffnot really"}))
    write_shard(tmp_path / "a-000.tar", samples[:2])
    write_shard(tmp_path / "a-001.tar", samples[2:])
    (tmp_path / "a-002.tar").write_bytes(b"not a tar at all" * 64)
    # a Hugging Face-style Parquet shard: an image struct column {bytes, path}, a null image, a caption column
    pq.write_table(pa.table({"image": [{"bytes": png(33, 70, 30), "path": None}, None], "text": ["x", "y"]}),
                   tmp_path / "b-000.parquet")
    out = tmp_path / "out"
    assert run(f"{tmp_path / 'a-*.tar'},{tmp_path / 'b-000.parquet'}", "--checkpoint", root / "ckpt", "--out", out,
               "--layer", "0", "--norm", "--meta", "parquet", "--out-dtype", "float16") == 0
    feats, _, rows = read_out(out, 4, "parquet")
    assert [r["key"] for r in rows] == ["k0", "broken", "k1", "k2", "", "row 0", "row 1"] and rows[1]["row"] is None
    assert rows[0]["source"].endswith("a-000.tar") and rows[2]["source"].endswith("a-001.tar")
    assert "not a readable tar" in rows[4]["error"]  # a bad shard is recorded and the run goes on
    assert rows[5]["source"].endswith("b-000.parquet") and rows[5]["row"] == 0 and "missing image" in rows[6]["error"]
    images = [Image.open(io.BytesIO(s[1]["png"])) for s in samples if s[0] != "broken"]
    images.append(Image.open(io.BytesIO(png(33, 70, 30))))
    with torch.no_grad():
        want = enc.encode(images, layers=[0], norm=True).pooled[0]
    assert feats.dtype == np.float16
    np.testing.assert_allclose(feats.astype(np.float32), want.numpy(), atol=2e-3, rtol=1e-3)
