"""Demo data is generated only for the demo: a mistyped or foreign path is an error naming it, and nothing of the
user's is written over or next to (issue 15, item 1)."""

import hashlib

import pytest

from genlip_fast.data.synthetic import demo_folder, generate_shards
from genlip_fast.train.__main__ import main


def _snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def user_folder(tmp_path):
    """A user's data folder: their own shard (not a real tar; it must never be read or replaced), a note, an empty
    folder and a folder of their other files."""
    mine = tmp_path / "mine"
    (mine / "empty").mkdir(parents=True)
    (mine / "other").mkdir()
    (mine / "train-000000.tar").write_bytes(b"the user's own shard, irreplaceable " * 100)
    (mine / "notes.txt").write_text("keep me")
    (mine / "other" / "notes.txt").write_text("keep me too")
    return mine


def _run(tmp_path, capsys, train_shards, val_shards="", *extra):
    rc = main(["--no-progress", f"--data.train_shards={train_shards}", f"--data.val_shards={val_shards}",
               f"--train.out_dir={tmp_path}/run", "--train.steps=1", "--train.device=cpu", *extra])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("where", ["shards_typo", "empty", "other/train-*.tar"])
def test_mistyped_path_writes_nothing_and_names_the_path(tmp_path, user_folder, capsys, where):
    # The tiny config (the CLI's default) has generate_demo_data on, and still: a folder that does not exist, an
    # existing empty folder, and the generator's pattern in a folder that holds other files are errors, not demo data
    # written into (or next to) the user's files. Before the fix, the first two replaced mine/train-000000.tar.
    before = _snapshot(user_folder)
    pattern = str(user_folder / where)
    rc, err = _run(tmp_path, capsys, pattern)
    assert rc == 2
    assert pattern in err and "Traceback" not in err
    assert _snapshot(user_folder) == before, "the run changed the user's folder"
    assert sorted(p.name for p in (user_folder / "empty").iterdir()) == []
    assert not (tmp_path / "run").exists(), "the run wrote output before failing on its input"


def test_demo_folder_accepts_only_a_new_or_empty_folder(tmp_path, user_folder):
    assert demo_folder(str(user_folder / "empty" / "train-*.tar")) == user_folder / "empty"
    assert demo_folder(str(tmp_path / "new" / "train-*.tar"), str(tmp_path / "new" / "val-*.tar")) == tmp_path / "new"
    for bad in (user_folder / "train-*.tar", user_folder / "notes.txt" / "train-*.tar", user_folder / "x-*.tar"):
        with pytest.raises(ValueError, match="data.train_shards"):
            demo_folder(str(bad))


def test_val_pattern_must_be_the_generators(tmp_path, capsys):
    rc, err = _run(tmp_path, capsys, tmp_path / "new" / "train-*.tar", tmp_path / "elsewhere" / "val-*.tar")
    assert rc == 2 and "data.val_shards" in err
    assert not (tmp_path / "new").exists()


def test_demo_data_off_is_a_plain_missing_shard_error(tmp_path, capsys):
    rc, err = _run(tmp_path, capsys, tmp_path / "new" / "train-*.tar", "", "--data.generate_demo_data=false")
    assert rc == 2 and "data.train_shards" in err and str(tmp_path / "new") in err
    assert not (tmp_path / "new").exists()


def test_generator_never_writes_over_a_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "val-000000.tar").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="val-000000.tar"):
        generate_shards(out, num_train=4, num_val=2, per_shard=2, size=32)
    # checked before anything is written: not even the train shards that come first exist
    assert sorted(p.name for p in out.iterdir()) == ["val-000000.tar"]
    assert (out / "val-000000.tar").read_bytes() == b"precious"
