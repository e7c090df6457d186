"""Options that reproduce the authors' runs: ``data.pixel_norm`` (one definition, used by the host decode, the DALI
graph, the captioning / encoder inputs and the probe; recorded with a checkpoint and checked when one is continued)
and ``optim.decay`` (which parameters AdamW decays). Today's presets keep today's values."""

import io
import json

import numpy as np
import pytest
import torch

from genlip_fast.checkpoint import inputs_from_meta
from genlip_fast.data.config import DataConfig
from genlip_fast.data.dali import DaliDecoder, dali_available
from genlip_fast.data.pipeline import build_data_loader
from genlip_fast.data.tokenizer import load_tokenizer
from genlip_fast.data.transforms import PIXEL_NORMS, host_decode, pixel_stats
from genlip_fast.data.webdataset import write_shard
from genlip_fast.model import GenLIP, get_preset
from genlip_fast.speak import ImageTransform
from genlip_fast.train.config import CONFIG_DIR, ConfigError, load_config
from genlip_fast.train.trainer import build_optimizer, param_groups

TOK = load_tokenizer("demo")


def jpeg_bytes(h, w, seed=0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def raw_pixels(data: bytes, stage: int, size: int) -> torch.Tensor:
    """The resized image's pixels in [0, 1] laid out as patches ``(P, 3 * 16 * 16)``: normalising with mean 0 and
    std 1 leaves them as they are."""
    return host_decode(data, stage=stage, image_size=size, pixel_norm=((0.0,) * 3, (1.0,) * 3))[0]


@pytest.mark.parametrize("stage", [1, 2])
def test_half_is_u8_over_255_minus_a_half_over_a_half_and_clip_is_clips(stage):
    data = jpeg_bytes(70, 130)
    raw = raw_pixels(data, stage, 64)
    half, grid = host_decode(data, stage=stage, image_size=64, pixel_norm="half")
    torch.testing.assert_close(half, (raw - 0.5) / 0.5, atol=1e-6, rtol=0)
    clip, grid2 = host_decode(data, stage=stage, image_size=64)  # the default: today's CLIP statistics
    mean, std = (torch.tensor(v).repeat_interleave(256) for v in PIXEL_NORMS["clip"])  # patch rows are (c, y, x)
    torch.testing.assert_close(clip, (raw - mean) / std, atol=1e-5, rtol=0)
    assert grid == grid2
    # the captioning / encoder inputs normalise through the same function: the same patches for the same settings
    t = ImageTransform(image_size=64 if stage == 1 else None, pixel_mean=PIXEL_NORMS["half"][0],
                       pixel_std=PIXEL_NORMS["half"][1])
    from genlip_fast.data.inputs import open_image

    assert torch.equal(t(open_image(data))[0], half)
    with pytest.raises(ValueError, match=r"'quarter'.*\['clip', 'half'\]"):
        pixel_stats("quarter")


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali cannot be imported")
def test_the_dali_graph_normalises_as_the_host_path():
    files = [jpeg_bytes(70, 130, seed=1), jpeg_bytes(200, 90, seed=2)]
    dali = DaliDecoder(stage=2, image_size=0, pixel_norm="half", batch_size=2, num_threads=1)
    for data, (patches, grid) in zip(files, dali(files)):
        want, want_grid = host_decode(data, stage=2, image_size=0, pixel_norm="half")
        assert grid == want_grid
        diff = (patches - want).abs()  # DALI's bicubic vs Pillow's, as in tests/test_data_pipeline.py, in std-0.5 units
        assert diff.mean() < 0.0054 and diff.max() < 0.27, (diff.mean(), diff.max())


def test_the_loader_and_the_probe_transform_take_data_pixel_norm(tmp_path):
    write_shard(tmp_path / "s-000000.tar", [(f"k{i}", {"jpg": jpeg_bytes(40, 56, seed=i), "txt": b"a red circle ."})
                                            for i in range(3)])
    cfg = DataConfig(train_shards=str(tmp_path / "*.tar"), backend="host", image_size=32, pixel_norm="half",
                     num_threads=1)
    loader = build_data_loader(cfg, TOK, epochs=1)
    samples = sorted(loader.samples(), key=lambda s: s.key)
    for i, s in enumerate(samples):
        torch.testing.assert_close(s.patches, (raw_pixels(jpeg_bytes(40, 56, seed=i), 1, 32) - 0.5) / 0.5,
                                   atol=1e-6, rtol=0)
    t = ImageTransform.of_data(cfg)  # how the trainer's probe sees its images
    assert (t.image_size, t.pixel_mean, t.pixel_std) == (32, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ConfigError, match=r"data.pixel_norm = 'siglip'; choose one of \['clip', 'half'\]"):
        load_config("tiny", ["--data.pixel_norm=siglip"])


def test_a_checkpoint_records_its_normalisation_and_speak_reads_it():
    """The job config in a checkpoint's meta.json carries data.pixel_norm; captioning and the encoder
    (``inputs_from_meta``) use it; a run that predates the option was CLIP-normalised."""
    model_config = {"patch_size": 16}
    half = inputs_from_meta({"model_config": model_config, "job_config": {"data": {"pixel_norm": "half"}}})
    assert (half.image.pixel_mean, half.image.pixel_std) == PIXEL_NORMS["half"]
    assert half.image.image_size is None  # captions keep the native aspect ratio
    old = inputs_from_meta({"model_config": model_config, "job_config": {"data": {"tokenizer": "demo"}}})
    assert (old.image.pixel_mean, old.image.pixel_std) == PIXEL_NORMS["clip"]


def test_continuing_a_checkpoint_with_another_normalisation_is_refused(shapes, tmp_path):
    """Imported official weights were trained on 0.5 / 0.5 pixels: a run that starts from them with CLIP's
    statistics is stopped before any work, with the option to pass."""
    from genlip_fast.checkpoint import import_official
    from genlip_fast.checkpoint.official import config_to_official, to_official, write_official
    from genlip_fast.train.preflight import check_compatible, pixel_norm_of
    from genlip_fast.train.trainer import build_model_config, train
    from tiny_run import tiny_config

    cfg = tiny_config(shapes, tmp_path / "run")
    mcfg = build_model_config(cfg, TOK).replace(attn_backend="auto", ce_backend="auto")
    model = GenLIP(mcfg)
    write_official(tmp_path / "theirs", config_to_official(mcfg), to_official(model.state_dict(), mcfg))
    import_official(tmp_path / "theirs", tmp_path / "imported")
    meta = json.loads((tmp_path / "imported" / "meta.json").read_text())
    assert pixel_norm_of(meta) == "half"
    with pytest.raises(ConfigError, match="data.pixel_norm = 'half', this run uses 'clip': pass "
                                          "--data.pixel_norm=half"):
        train(tiny_config(shapes, tmp_path / "run", checkpoint__init_from=str(tmp_path / "imported")),
              progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    check_compatible(tmp_path / "imported", tiny_config(shapes, tmp_path / "run2", data__pixel_norm="half"),
                     mcfg, option="checkpoint.init_from")  # the same normalisation: accepted


def tiny_model():
    torch.manual_seed(0)
    return GenLIP(get_preset("tiny", vocab_size=64, mlp_bias=True))


def test_decay_all_decays_every_parameter_and_matrices_only_matrices():
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, plain = param_groups(model, 0.1, "matrices")
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    vectors = {n for n, p in model.named_parameters() if p.dim() < 2}  # norms, biases (MLP ones too), layer scales
    assert len(vectors) > 4 * len(model.blocks) and "norm.weight" in vectors
    assert {names[id(p)] for p in plain["params"]} == vectors | {"text_embed.weight", "patch_embed.weight"}
    assert all(p.dim() == 2 for p in decayed["params"])
    every, none = param_groups(model, 0.01, "all")
    assert len(every["params"]) == len(list(model.parameters())) and not none["params"]
    with pytest.raises(ValueError, match="decay"):
        param_groups(model, 0.1, "biases")


@pytest.mark.parametrize("config,decay", [("so16_official_stage1", "all"), ("so16_official_stage2", "all"),
                                          ("so16_stage1", "matrices"), ("tiny", "matrices")])
def test_the_optimizer_follows_optim_decay(config, decay):
    cfg = load_config(config)
    model = tiny_model()
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(wd) == len(list(model.parameters()))
    for n, p in model.named_parameters():
        matrix = p.dim() == 2 and "embed" not in n
        assert wd[id(p)] == (cfg.optim.weight_decay if decay == "all" or matrix else 0.0), n
    assert cfg.optim.decay == decay


def test_todays_presets_keep_todays_normalisation_and_decay():
    for p in sorted(CONFIG_DIR.glob("*.toml")):
        cfg = load_config(p.stem)
        official = "official" in p.stem
        assert cfg.data.pixel_norm == ("half" if official else "clip"), p.name
        assert cfg.optim.decay == ("all" if official else "matrices"), p.name
