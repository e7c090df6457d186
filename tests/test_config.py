"""Job config: bundled presets load, mistakes are clear errors, overrides win."""

import pytest

from genlip_fast.train.config import CONFIG_DIR, ConfigError, load_config

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def test_all_paper_presets_are_bundled():
    for model in ("l16", "so16", "g16"):
        for stage in (1, 2):
            assert f"{model}_stage{stage}" in PRESETS
    assert "tiny" in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_bundled_preset_loads(name):
    cfg = load_config(name)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.optim.grad_clip == 1.0


@pytest.mark.parametrize("model,preset,warmup,batch,drop", [
    ("l16", "L/16", 0.007, 32768, 0.1), ("so16", "So/16", 0.007, 32768, 0.1), ("g16", "g/16", 0.02, 49152, 0.2),
])
def test_paper_table2_values(model, preset, warmup, batch, drop):
    s1, s2 = load_config(f"{model}_stage1"), load_config(f"{model}_stage2")
    for cfg in (s1, s2):
        assert cfg.model.preset == preset and cfg.model.drop_path == drop
        assert cfg.optim.warmup_ratio == warmup and cfg.optim.min_lr == 1e-6
        assert cfg.data.pack_tokens == 16384 and cfg.data.tokenizer == "qwen"
    assert s1.optim.lr == 1e-3 and s1.train.global_batch_samples == batch and s1.data.image_size == 224
    assert s2.optim.lr == 1e-4 and s2.train.global_batch_samples == 3600
    assert s1.data.stage == 1 and s2.data.stage == 2 and (s2.data.min_patches, s2.data.max_patches) == (16, 1024)
    assert s2.checkpoint.init_from  # stage 2 starts from stage 1's weights


def test_overrides_win_and_convert():
    cfg = load_config("tiny", ["--optim.lr=3e-4", "--train.steps=7", "--parallel.compile=true",
                               "--optim.betas=0.8,0.9", "--checkpoint.init_from=runs/x", "--model.vocab_size=none"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7 and cfg.parallel.compile is True
    assert cfg.optim.betas == (0.8, 0.9) and cfg.checkpoint.init_from == "runs/x" and cfg.model.vocab_size is None


def test_toml_file_path(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text('[model]\npreset = "tiny-hd72"\n[parallel]\nactivation_checkpoint = "ratio"\nac_ratio = 0.25\n')
    cfg = load_config(str(p))
    assert cfg.model.preset == "tiny-hd72" and cfg.parallel.ac_ratio == 0.25


@pytest.mark.parametrize("override,match", [
    ("--optim.lrr=1", "unknown key optim.'lrr'"),
    ("--nosuch.key=1", "unknown key 'nosuch'"),
    ("--train.steps=many", "train.steps"),
    ("--train.steps=1.5", "train.steps"),
    ("--parallel.compile=maybe", "parallel.compile"),
    ("--optim.betas=0.9", "optim.betas"),
    ("--parallel.activation_checkpoint=some", "parallel.activation_checkpoint"),
    ("--model.attn_backend=fast", "model.attn_backend"),
    ("--model.preset=XL/14", "model.preset"),
    ("--parallel.ac_ratio=0", "parallel.ac_ratio"),
    ("--train.steps=0", "train.steps"),
    ("train.steps=3", "must look like"),
])
def test_mistakes_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(".", r"\.")):
        load_config("tiny", [override])


def test_unknown_key_or_wrong_type_in_toml(tmp_path):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_config(str(bad_key))
    bad_type = tmp_path / "b.toml"
    bad_type.write_text('[optim]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(str(bad_type))
    with pytest.raises(ConfigError, match="bundled presets"):
        load_config("no_such_preset")
    torn = tmp_path / "c.toml"
    torn.write_text("[train\nsteps = ")  # before: a tomllib traceback from the command line
    with pytest.raises(ConfigError, match=r"config file .*c\.toml: Expected '\]' at the end of a table declaration"):
        load_config(str(torn))


def _numeric_options():
    from genlip_fast.train.config import JobConfig
    from genlip_fast.train.tables import numeric_fields

    return sorted(numeric_fields(JobConfig()))


def _bad_values(dotted: str) -> list[str]:
    import typing

    from genlip_fast.train.config import RANGES, JobConfig

    if dotted == "optim.betas":
        return ["0.9,1.0", "-0.1,0.95", "nan,0.9"]
    rule = next((r for r, keys in RANGES.items() if dotted in keys), None)
    bad = {">= 1": ["0", "-1"], ">= 0": ["-1"], "> 0": ["0", "-1e-3"], "in [0, 1)": ["1", "-0.1"],
           "in (0, 1]": ["0", "1.5"], None: ["3"]}[rule]  # None: a numeric choice (data.stage)
    obj, *parents, key = [JobConfig(), *dotted.split(".")]
    for p in parents:  # a list of tables ("data.sources.weight") takes its item type
        tp = typing.get_type_hints(type(obj))[p]
        obj = typing.get_args(tp)[0]() if typing.get_origin(tp) is list else getattr(obj, p)
    tp = typing.get_type_hints(type(obj))[key]
    return bad + (["nan", "inf"] if float in (tp, *typing.get_args(tp)) else [])


def _override(dotted: str, value: str) -> str:
    """``--section.key=value``; for a field of a list of tables, the list with one table holding the value."""
    *parents, key = dotted.split(".")
    if len(parents) == 2:
        return f'--{".".join(parents)}=[{{path = "x/*.tar", {key} = {value}}}]'
    return f"--{dotted}={value}"


@pytest.mark.parametrize("dotted", _numeric_options())
def test_every_numeric_option_is_range_checked(dotted):
    # issue 15 item 2: --data.batch_size=0 was accepted and then read records forever (+34 MB/s, no output);
    # lookahead, prefetch and num_threads of 0 / -1 passed silently. Every numeric option now has a range.
    for value in _bad_values(dotted):
        with pytest.raises(ConfigError, match=rf"{dotted.replace('.', '[.]')}.*allowed|choose one of"):
            load_config("tiny", [_override(dotted, value)])


def test_ranges_name_only_real_options():
    from genlip_fast.train.config import CHOICES, RANGES

    listed = [k for keys in RANGES.values() for k in keys]
    assert len(listed) == len(set(listed)), "an option is listed under two ranges"
    assert set(listed) | {k for k in CHOICES if k in _numeric_options()} == set(_numeric_options())


@pytest.mark.parametrize("override,match", [
    ("--data.prefetch=0", None),  # 0 = no background thread: allowed
    ("--optim.min_lr=0.01", "optim.min_lr"),  # above the peak lr (2e-3 in tiny)
    ("--data.min_patches=2000", "data.min_patches"),
    ("--data.image_size=72", "multiple of data.patch_size"),
])
def test_cross_field_checks(override, match):
    if match is None:
        load_config("tiny", [override])
    else:
        with pytest.raises(ConfigError, match=match):
            load_config("tiny", [override])


def test_zero_batch_size_fails_fast_from_the_cli(capsys):
    from genlip_fast.train.__main__ import main

    assert main(["--data.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "data.batch_size = 0" in err and ">= 1" in err
