"""Data as users bring it (issue 25 items 1, 2, 8): shard specs as users write them, caption rules for every layout,
the [data] sources in the config, and the tiny preset's demo-only parts stepping aside on other data."""

import gzip
import io
import json
import logging
import tarfile

import pytest

from genlip_fast.data.captions import MissingCaption, RuleError, parse_rule
from genlip_fast.data.config import DataConfig, data_sources
from genlip_fast.data.reader import ShardReader
from genlip_fast.data.specs import CompressedShardsError, NoShardsError, expand_braces, expand_spec
from genlip_fast.train.config import ConfigError, load_config


def touch(root, *names):
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def rel(root, paths):
    return [str(p)[len(str(root)) + 1:] for p in paths]


# -- item 1: shard specs -------------------------------------------------------------------------------------------

def test_brace_expansion_as_the_shell_writes_it():
    assert expand_braces("s/{000000..000002}.tar") == ["s/000000.tar", "s/000001.tar", "s/000002.tar"]
    assert expand_braces("{a,b}-{8..12..2}") == ["a-8", "a-10", "a-12", "b-8", "b-10", "b-12"]
    assert expand_braces("{x,y{1,2}}.tar") == ["x.tar", "y1.tar", "y2.tar"]  # nested
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{abc}-{1,2}") == ["{abc}-1", "{abc}-2"]  # no comma, no range: literal
    assert expand_braces("open{1..2") == ["open{1..2"]  # unmatched: literal
    assert len(expand_braces("{000000..099999}.tar")) == 100_000


def test_specs_ranges_globs_folders_lists_and_what_they_take(tmp_path):
    touch(tmp_path, *[f"s1/{i:06d}.tar" for i in range(20)], *[f"s1/{i:06d}.tar.idx" for i in range(20)],
          "s1/genlip-manifest.json", "s1/.hidden.tar", "s1/deep/er/x.tar", "s1/photo.jpg", "b/b.parquet")
    root = str(tmp_path)
    # the README's Slurm form: a zero-padded range (20 names in one folder are checked with one listing)
    assert rel(tmp_path, expand_spec(f"{root}/s1/{{000000..000019}}.tar")) == [f"s1/{i:06d}.tar" for i in range(20)]
    # a folder is searched recursively and only shards are taken (no sidecars, manifest, images, hidden files)
    folder = rel(tmp_path, expand_spec(f"{root}/s1"))
    assert folder == [f"s1/{i:06d}.tar" for i in range(20)] + ["s1/deep/er/x.tar"]
    assert rel(tmp_path, expand_spec(f"{root}/s1/**/*.tar")) == folder  # ** crosses folders
    # comma lists: parts in order, each sorted; commas inside braces belong to the braces; a shard once
    spec = f"{root}/b/b.parquet,{root}/s1/{{000001,000000}}.tar, {root}/s1/000000.tar"
    assert rel(tmp_path, expand_spec(spec)) == ["b/b.parquet", "s1/000000.tar", "s1/000001.tar"]
    assert expand_spec(f"{root}/s1/000003.tar") == [f"{root}/s1/000003.tar"]  # a plain path stays as written


def test_a_spec_that_matches_nothing_says_what_it_looked_for(tmp_path):
    touch(tmp_path, *[f"s/{i:06d}.tar" for i in range(3)], "img/a.jpg")
    root = str(tmp_path)
    cases = {
        f"{root}/s/{{000000..000009}}.tar": ["7 of the 10 paths", f"{root}/s/000003.tar", "a glob (*)"],
        f"{root}/nothing_here": ["no file or folder", f"{root}/nothing_here"],
        f"{root}/s/*.parquet": ["glob", "matches no shard"],
        f"{root}/img": ["folder", "holds no shard", "searched recursively"],
        f"{root}/s/000000.tar,{root}/t/*.tar": [f"{root}/t/*.tar"],  # every part must match
        "": ["empty spec"],
    }
    for spec, words in cases.items():
        with pytest.raises(NoShardsError) as e:
            expand_spec(spec)
        assert isinstance(e.value, FileNotFoundError)  # what callers catch for a missing shard
        for w in words:
            assert w in str(e.value), (spec, str(e.value))


def test_img2dataset_folder_reads_the_tars_only(tmp_path):
    touch(tmp_path, *[f"i2d/{i:05d}{ext}" for i in range(3) for ext in (".tar", ".parquet", "_stats.json")],
          *[f"hf/train-{i:05d}-of-00002.parquet" for i in range(2)])
    assert rel(tmp_path, expand_spec(str(tmp_path / "i2d"))) == [f"i2d/{i:05d}.tar" for i in range(3)]
    # a folder of parquet files without tars is a parquet dataset
    assert rel(tmp_path, expand_spec(str(tmp_path / "hf"))) == [f"hf/train-{i:05d}-of-00002.parquet" for i in range(2)]
    with pytest.raises(NoShardsError, match="img2dataset metadata.*point at the .tar files"):
        expand_spec(str(tmp_path / "i2d" / "*.parquet"))


@pytest.mark.parametrize("suffix,tool", [(".tar.gz", "gzip -dc"), (".tgz", "gzip -dc"), (".tar.zst", "zstd -dc"),
                                         (".tar.bz2", "bzip2 -dc"), (".tar.xz", "xz -dc")])
def test_compressed_shards_are_refused_with_the_command(tmp_path, suffix, tool):
    touch(tmp_path, f"c/a{suffix}", "c/b.tar")
    for spec in (str(tmp_path / "c"), str(tmp_path / "c" / f"a{suffix}")):
        with pytest.raises(CompressedShardsError, match="exact resume") as e:
            expand_spec(spec)
        assert f"a{suffix}" in str(e.value) and tool in str(e.value)


def test_a_compressed_file_named_tar_is_a_bad_shard(tmp_path):
    # tarfile opens a .tar.gz transparently, so the index held offsets of the decompressed stream and every sample
    # was then read raw as "not an image"; now it is an unreadable shard, skipped and reported with its path
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("k.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "a.tar").write_bytes(gzip.compress(raw.getvalue()))
    reader = ShardReader([str(tmp_path / "a.tar")])
    assert reader.count(0) == 0 and "not a readable tar" in reader._bad[0]


# -- item 2: caption rules -----------------------------------------------------------------------------------------

def js(obj) -> bytes:
    return json.dumps(obj).encode()


LLAVA = [{"from": "human", "value": "<image>\nDescribe the image in detail."},
         {"from": "gpt", "value": "A red circle above a blue square."}]
CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown? <image>"}]},
        {"role": "assistant", "content": "Two shapes <image> on grey."}]

CAPTION_CASES = [
    # (layout, fields, rule, caption, prompt)
    ("authors' stage 1", {"json": js({"caption": " a dog on grass "})}, "auto", "a dog on grass", None),
    ("authors' stage 2", {"json": js({"conversations": LLAVA})}, "auto", "A red circle above a blue square.", None),
    ("stage 2, 'conversation'", {"json": js({"conversation": LLAVA})}, "auto", "A red circle above a blue square.",
     None),
    ("stage 2, else caption", {"json": js({"caption": "short one"})}, "auto", "short one", None),
    ("conversation first", {"json": js({"conversations": LLAVA, "caption": "x"})}, "auto",
     "A red circle above a blue square.", None),
    ("user/assistant chat", {"json": js({"messages": CHAT})}, "conv+prompt", "Two shapes on grey.", "What is shown?"),
    ("{ROLE: TEXT} turns", {"json": js({"conversations": [{"human": "q?"}, {"gpt": "an answer"}]})}, "conv+prompt",
     "an answer", "q?"),
    ("Gemini's user/model turns", {"json": js({"messages": [{"role": "user", "content": "q?"},
                                                             {"role": "model", "content": "a reply"}]})},
     "conv+prompt", "a reply", "q?"),
    ("prompt kept", {"json": js({"conversations": LLAVA})}, "conv+prompt", "A red circle above a blue square.",
     "Describe the image in detail."),
    ("last assistant of several", {"json": js({"conversations": LLAVA + [{"from": "human", "value": "more"},
                                                                          {"from": "gpt", "value": "second"}]})},
     "conv", "second", None),
    ("BLIP3o txt", {"txt": b"A long caption.\n"}, "auto", "A long caption.", None),
    ("img2dataset txt + json", {"txt": b"from txt", "json": js({"caption": "from json"})}, "auto", "from txt", None),
    ("dotted path with list index", {"json": js({"conversations": LLAVA})}, "json:conversations.-1.value",
     "A red circle above a blue square.", None),
    ("nested key", {"json": js({"meta": {"caption": "deep"}})}, "json:meta.caption", "deep", None),
    ("fallback order", {"json": js({"caption": "plain", "re_caption": ""})}, "txt;json:re_caption;json:caption",
     "plain", None),
    ("a Parquet row (parsed)", {"json": {"re_caption": "recap", "url": "u"}}, "json:re_caption", "recap", None),
    ("conversation at a path", {"json": js({"data": {"turns": LLAVA}})}, "conv:data.turns",
     "A red circle above a blue square.", None),
]


@pytest.mark.parametrize("layout,fields,rule,caption,prompt", CAPTION_CASES, ids=[c[0] for c in CAPTION_CASES])
def test_caption_rules_find_every_layout(layout, fields, rule, caption, prompt):
    found = parse_rule(rule).caption({"jpg": b"", **fields})
    assert (found.text, found.prompt) == (caption, prompt)


MISSING_CASES = [
    # (case, fields, rule, reason, words in the detail)
    ("a list is not text", {"json": js({"caption": ["a", "b"]})}, "json:caption", "missing caption", ["a list of 2"]),
    ("an object is not text", {"json": js({"caption": {"en": "x"}})}, "json:caption", "missing caption",
     ["an object"]),
    ("a number is not text", {"json": js({"caption": 7})}, "json:caption", "missing caption", ["is 7, not text"]),
    ("malformed json", {"json": b'{"caption": "x"'}, "auto", "bad json", ["not valid JSON", "txt: no .txt member"]),
    ("not utf-8", {"json": b"\xff\xfe\x00"}, "json:caption", "bad json", ["not valid JSON"]),
    ("no assistant turn", {"json": js({"conversations": [{"from": "human", "value": "q"}]})}, "conv",
     "missing caption", ["no assistant turn"]),
    ("assistant turn without text", {"json": js({"conversations": [{"from": "gpt", "value": None}]})}, "conv",
     "missing caption", ["holds null"]),
    ("index outside the list", {"json": js({"conversations": []})}, "json:conversations.-1.value",
     "missing caption", ["outside a list of 0"]),
    ("nothing at all", {}, "auto", "missing caption", ["no .txt member", "no .json member"]),
    ("empty everywhere", {"txt": b"  \n", "json": js({"caption": ""})}, "auto", "empty caption", ["txt", "empty"]),
]


@pytest.mark.parametrize("case,fields,rule,reason,words", MISSING_CASES, ids=[c[0] for c in MISSING_CASES])
def test_no_caption_is_skipped_under_its_reason_with_what_was_found(case, fields, rule, reason, words):
    with pytest.raises(MissingCaption) as e:
        parse_rule(rule).caption({"jpg": b"", **fields})
    assert e.value.reason == reason
    for w in words:
        assert w in e.value.detail, e.value.detail
    assert parse_rule(rule).extract({"jpg": b"", **fields}) is None


@pytest.mark.parametrize("rule,words", [
    ("", "empty"), ("json", "names no field"), ("json:", "names no field"), ("json:a..b", "empty key"),
    ("txt;;json:a", "empty alternative"), ("caption", "did you mean json:caption"), ("conv:", "no path"),
    ("txt:x", "unknown alternative"),
])
def test_bad_rule_syntax_names_the_rule_and_the_problem(rule, words):
    with pytest.raises(RuleError, match=words) as e:
        parse_rule(rule)
    assert repr(rule) in str(e.value)


def test_rules_describe_what_they_look_for():
    assert parse_rule("auto").describe() == ("txt, json conversations (last assistant turn), json caption, "
                                             "json text")
    assert parse_rule("conv+prompt;json:re_caption").describe() == (
        "json conversations (last assistant turn and its prompt), json re_caption")


# -- the sources in the config ----------------------------------------------------------------------------------------

def test_sources_from_train_shards_toml_and_the_command_line(tmp_path, caplog):
    with pytest.raises(ValueError, match="no training data: set data.train_shards"):
        data_sources(DataConfig())
    two = data_sources(DataConfig(train_shards="/d/blip3o/{00..09}.tar; /d/s2/ "))  # the authors' "p1;p2"
    assert [(s.name, s.spec, s.weight) for s in two] == [("blip3o", "/d/blip3o/{00..09}.tar", 1.0), ("s2", "/d/s2/", 1.0)]
    toml = tmp_path / "mix.toml"
    toml.write_text('[data]\ncaption = "txt"\n[[data.sources]]\npath = "/d/blip3o/*.tar"\nweight = 3\n'
                    '[[data.sources]]\npath = "/d/s2/*.tar"\ncaption = "json:re_caption;json:caption"\n'
                    'prompt = "Describe the image in detail."\nname = "recap"\n')
    cfg = load_config(str(toml))
    got = [(s.name, s.rule.text, s.weight, s.prompt) for s in data_sources(cfg.data)]
    assert got == [("blip3o", "txt", 3.0, ""), ("recap", "json:re_caption;json:caption", 1.0,
                                                "Describe the image in detail.")]
    cli = load_config("tiny", ['--data.sources=[{path="a/*.tar", weight=2}, {path="b/*.tar"}]'])
    assert cli.data.train_shards == ""  # the user's sources replace the preset's demo shards
    assert [(s.spec, s.weight) for s in data_sources(cli.data)] == [("a/*.tar", 2.0), ("b/*.tar", 1.0)]
    with caplog.at_level(logging.WARNING):
        old = load_config("tiny", ["--data.caption_field=meta.caption"])
    assert old.data.caption == "json:meta.caption" and "caption_field is deprecated" in caplog.text


@pytest.mark.parametrize("override,words", [
    (['--data.sources=[{path="a/*.tar"}]', "--data.train_shards=b/*.tar"], "both set: use one"),
    (['--data.sources=[{path="a/*.tar", weight=-1}]'], "data.sources.weight"),
    (['--data.sources=[{path=""}]'], "data.sources[0].path is empty"),
    (['--data.sources=[{path="a", caption="json:"}]'], "data.sources[0].caption: caption rule 'json:'"),
    (['--data.sources=[{path="a", wieght=2}]'], "unknown key data.sources[0].'wieght'"),
    (["--data.sources=[path=a]"], "not a TOML array of tables"),
    (["--data.caption=captions"], "data.caption: caption rule 'captions'"),
    (["--data.caption_field=x", "--data.caption=txt"], "disagree"),
])
def test_source_mistakes_are_config_errors_naming_the_key(override, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_config("tiny", override)


# -- item 8: the tiny preset on the user's data ------------------------------------------------------------------

def test_tiny_preset_demo_parts_step_aside_on_other_data_in_one_line(tmp_path, caplog):
    touch(tmp_path, "mine/train-000000.tar")  # the user's own shards, named as convert names them
    with caplog.at_level(logging.INFO, logger="genlip_fast.train"):
        cfg = load_config("tiny", [f"--data.train_shards={tmp_path}/mine/train-*.tar"])
    assert (cfg.data.val_shards, cfg.eval.packs, cfg.eval.captions, cfg.eval.probe_train, cfg.eval.probe_val) == (
        "", 0, 0, "", "")
    lines = [r.getMessage() for r in caplog.records if "step aside" in r.getMessage()]
    assert len(lines) == 1 and "data.val_shards" in lines[0] and "probe" in lines[0]
    # what the user set is used as written (and is their error if unusable)
    kept = load_config("tiny", [f"--data.train_shards={tmp_path}/mine/train-*.tar", "--eval.probe_train=demo",
                                "--eval.probe_val=demo", "--data.val_shards=v/*.tar"])
    assert (kept.data.val_shards, kept.eval.packs, kept.eval.probe_train) == ("v/*.tar", 2, "demo")
    # the demo's own data, here or in another folder (generated there on first run): nothing steps aside
    assert load_config("tiny").eval.probe_train == "demo"
    elsewhere = load_config("tiny", [f"--data.train_shards={tmp_path}/new/train-*.tar"])
    assert elsewhere.eval.probe_train == "demo" and elsewhere.data.val_shards == f"{tmp_path}/new/val-*.tar"
    # a user TOML is the user's: nothing in it steps aside
    own = tmp_path / "own.toml"
    own.write_text(f'[data]\ntrain_shards = "{tmp_path}/mine/train-*.tar"\ngenerate_demo_data = true\n'
                   '[eval]\nprobe_train = "demo"\nprobe_val = "demo"\n')
    assert load_config(str(own)).eval.probe_train == "demo"
