"""``python -m genlip_fast.data report``: on the demo data and on a generated stage-2 mixture (a tar source and a
Parquet source with bad records), every figure checked against a direct count."""

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from genlip_fast.data.reader import ShardReader
from genlip_fast.data.tokenizer import load_tokenizer
from genlip_fast.data.transforms import grid_for
from genlip_fast.data.webdataset import iter_shard, write_shard


def test_report_on_the_demo_data_matches_a_direct_count(shapes, tmp_path, capsys):
    from genlip_fast.data.__main__ import main

    out = tmp_path / "report.json"
    spec = str(shapes / "train-*.tar")
    assert main(["report", spec, "--tokenizer", "demo", "--image-size", "64", "--pack-tokens", "1024", "--sample",
                 "0", "--global-batch", "100", "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    captions = [f["txt"].decode() for p in sorted(shapes.glob("train-*.tar")) for _, f in iter_shard(p)]
    tokens = [len(t) for t in load_tokenizer("demo").encode_batch(captions, add_eot=True)]
    assert rep["dataset"] == {"shards": 4, "samples": len(captions), "samples_from": "manifest", "bad_shards": {}}
    assert rep["scanned"] == {"shards": 4, "records": 240, "good": 240, "skipped": {}, "good_share": 1.0}
    assert rep["caption_tokens"]["max"] == max(tokens) and rep["caption_tokens"]["mean"] == round(np.mean(tokens), 2)
    assert rep["caption_tokens"]["p50"] == np.percentile(tokens, 50)
    assert rep["image_size"]["height"]["min"] == rep["image_size"]["width"]["max"] == 64
    assert rep["patches_per_image"]["min"] == rep["patches_per_image"]["max"] == 16  # (64 / 16)^2
    assert rep["tokens_per_sample"]["mean"] == round(16 + np.mean(tokens), 2)
    pk = rep["packing"]
    assert pk["lookahead"] == 1 and 0.9 < pk["fill"] <= 1 and pk["samples_per_pack"] * pk["packs"] <= 240
    assert pk["samples_per_pack"] == pytest.approx(pk["fill"] * 1024 / (16 + np.mean(tokens)), rel=0.05)
    st = rep["steps"]
    assert st == {"global_batch": 100, "usable_samples": 240, "steps_per_epoch": 3,
                  "tokens_per_sample": round(16 + np.mean(tokens), 1),
                  "packs_per_step": math.ceil(100 / math.floor(1024 / (16 + np.mean(tokens))))}
    assert "samples         240  (manifest)" in printed and "steps/epoch     3 at 100 samples per step" in printed


def flat_jpeg(w, h, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), tuple(int(c) for c in np.random.default_rng(seed).integers(0, 256, 3))).save(buf, "JPEG")
    return buf.getvalue()


def test_report_on_a_stage2_mixture_with_bad_records(tmp_path):
    """Two sources as one spec: a tar folder (images of every aspect, ~230-token captions, a truncated image and one
    smaller than a patch) and an img2dataset-style Parquet file (a failed download)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from genlip_fast.data.report import ReportOptions, build_report

    rng = np.random.default_rng(0)
    words = "a photo of the red bus parked near an old stone bridge while people walk by in the rain".split()
    long_caption = lambda: " ".join(rng.choice(words, int(rng.integers(120, 260))))  # noqa: E731
    sizes = [(640, 480), (480, 640), (1920, 1080), (300, 2000), (2000, 90), (32, 32), (800, 800), (1024, 200)]
    samples = [(f"k{i:03d}", {"jpg": flat_jpeg(*sizes[i % len(sizes)], seed=i), "txt": long_caption().encode()})
               for i in range(30)]
    samples[4][1]["jpg"] = samples[4][1]["jpg"][:-40]  # truncated
    samples[7][1]["jpg"] = flat_jpeg(8, 8)  # 64 pixels: less than one 16x16 patch
    write_shard(tmp_path / "s2a" / "a-000000.tar", samples[:15])
    write_shard(tmp_path / "s2a" / "a-000001.tar", samples[15:])
    (tmp_path / "s2b").mkdir()
    rows = [(flat_jpeg(*sizes[i % len(sizes)], seed=100 + i) if i != 3 else None, long_caption()) for i in range(12)]
    pq.write_table(pa.table({"jpg": pa.array([r[0] for r in rows], pa.binary()), "txt": [r[1] for r in rows]}),
                   tmp_path / "s2b" / "00000.parquet", row_group_size=5)
    spec = f"{tmp_path}/s2a/*.tar,{tmp_path}/s2b/*.parquet"
    rep = build_report(spec, ReportOptions(stage=2, sample=0, tokenizer="qwen"), progress=False)

    reader = ShardReader([str(p) for p in sorted((tmp_path / "s2a").glob("*.tar"))] +
                         [str(tmp_path / "s2b" / "00000.parquet")], stage=2)
    good = [r for s in range(3) for i in range(reader.count(s)) if not hasattr((r := reader.read(s, i)), "reason")]
    tok = load_tokenizer("qwen")
    tokens = [len(t) for t in tok.encode_batch([r.caption for r in good], add_eot=True)]
    patches = [math.prod(grid_for(*r.hw, stage=2, image_size=0, patch=16)) for r in good]
    assert rep["dataset"]["samples"] == 42 and rep["dataset"]["samples_from"] == "counted"
    assert rep["scanned"]["skipped"] == {"truncated image": 1, "image smaller than a patch": 1, "missing image": 1}
    assert rep["scanned"]["good"] == len(good) == 39
    assert rep["caption_tokens"]["max"] == max(tokens) and rep["caption_tokens"]["min"] == min(tokens)
    assert 16 <= rep["patches_per_image"]["min"] == min(patches) and rep["patches_per_image"]["max"] == max(patches)
    assert max(patches) <= 1024 and rep["tokens_per_sample"]["mean"] == round(np.mean(patches) + np.mean(tokens), 2)
    assert rep["packing"]["lookahead"] == 64 and 0 < rep["packing"]["fill"] <= 1
    assert rep["steps"]["steps_per_epoch"] == 1 and rep["steps"]["usable_samples"] == round(42 * 39 / 42)


def test_report_counts_the_prompt_a_conversation_keeps(tmp_path):
    """With conv+prompt the question goes into every sample (the loader packs it, without loss): the report's tokens
    per sample and packing count it. Two sources in the authors' 'p1;p2' form are read as one population."""
    from genlip_fast.data.report import ReportOptions, build_report

    question = "<image>\nDescribe the image in detail."
    for name in ("a", "b"):
        write_shard(tmp_path / name / "000000.tar", [
            (f"{name}{i}", {"jpg": flat_jpeg(64, 64, seed=i), "json": json.dumps({"conversations": [
                {"from": "human", "value": question}, {"from": "gpt", "value": f"a red circle {i}"}]}).encode()})
            for i in range(3)])
    spec = f"{tmp_path}/a;{tmp_path}/b"
    opt = ReportOptions(sample=0, tokenizer="demo", image_size=64, pack_tokens=256)
    plain = build_report(spec, opt, progress=False)
    kept = build_report(spec, ReportOptions(**{**opt.__dict__, "caption": "conv+prompt"}), progress=False)
    tok = load_tokenizer("demo")
    prompt = len(tok.encode("Describe the image in detail."))
    captions = [len(t) for t in tok.encode_batch([f"a red circle {i}" for i in range(3)] * 2, add_eot=True)]
    assert plain["scanned"]["good"] == kept["scanned"]["good"] == 6 and plain["prompt_tokens"] == {}
    assert plain["tokens_per_sample"]["mean"] == round(16 + np.mean(captions), 2)
    assert kept["prompt_tokens"]["min"] == kept["prompt_tokens"]["max"] == prompt
    assert kept["tokens_per_sample"]["mean"] == round(16 + prompt + np.mean(captions), 2)
    assert kept["caption_tokens"] == plain["caption_tokens"]


def test_report_on_a_sample_estimates_the_size_from_the_shards_it_opened(tmp_path, monkeypatch):
    """No manifest: the size is counted from every shard (each opened once, though the reader keeps only 4 open),
    or, reading a sample, estimated from the shards opened for it."""
    from genlip_fast.data import reader as reader_mod
    from genlip_fast.data.report import ReportOptions, build_report

    opened = []
    real_open = reader_mod.open_shard
    monkeypatch.setattr(reader_mod, "open_shard", lambda path, **kw: opened.append(path) or real_open(path, **kw))

    for s in range(6):
        write_shard(tmp_path / f"{s:06d}.tar", [(f"k{s}{i}", {"jpg": flat_jpeg(32, 32, seed=i), "txt": b"a box"})
                                               for i in range(5)])
    rep = build_report(str(tmp_path), ReportOptions(sample=3, tokenizer="demo", image_size=32), progress=False)
    assert rep["dataset"]["samples"] == 30 and rep["dataset"]["samples_from"] == "estimated from 3 of 6 shards"
    assert rep["scanned"] == {"shards": 3, "records": 3, "good": 3, "skipped": {}, "good_share": 1.0}
    (tmp_path / "000006.tar").write_bytes(b"not a tar")
    del opened[:]
    rep = build_report(str(tmp_path), ReportOptions(sample=0, tokenizer="demo", image_size=32), progress=False)
    assert rep["dataset"]["samples"] == 30 and rep["dataset"]["samples_from"] == "counted"
    assert list(rep["dataset"]["bad_shards"]) == [str(tmp_path / "000006.tar")]
    assert sorted(opened) == [str(tmp_path / f"{s:06d}.tar") for s in range(7)]  # each once
