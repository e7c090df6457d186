"""Data as users bring it: Parquet shards (img2dataset's, Hugging Face's layouts), and what the converter reads
(LLaVA JSON arrays, COCO captions, TSV, Parquet listings), from real files the tests write."""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from genlip_fast.data.captions import parse_rule  # noqa: E402
from genlip_fast.data.config import DataConfig  # noqa: E402
from genlip_fast.data.pipeline import build_data_loader  # noqa: E402
from genlip_fast.data.reader import ShardReader, Skipped  # noqa: E402
from genlip_fast.data.tokenizer import load_tokenizer  # noqa: E402

TOK = load_tokenizer("demo")


def jpeg(seed: int, w: int = 32, h: int = 32, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_parquet(path, columns: dict, *, row_group_size: int = 4, schema=None) -> str:
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=row_group_size)
    return str(path)


def read_all(reader: ShardReader):
    out = []
    for s in range(len(reader.shards)):
        out += [reader.read(s, i) for i in range(reader.count(s))]
    return out


# -- Parquet shards -------------------------------------------------------------------------------------------------
def test_img2dataset_parquet_output_reads_with_bad_rows_skipped_by_file_and_row(tmp_path):
    """img2dataset's `parquet` output: key, jpg (binary, null where the download failed), txt, metadata columns."""
    images = [jpeg(i) for i in range(10)]
    images[3] = None  # a failed download
    images[6] = images[6][: len(images[6]) // 2]  # a truncated image
    path = write_parquet(tmp_path / "00000.parquet", {
        "key": [f"{i:09d}" for i in range(10)], "jpg": pa.array(images, pa.binary()),
        "txt": [f"a red circle {i}" for i in range(10)], "url": [f"http://x/{i}.jpg" for i in range(10)],
        "status": ["success"] * 10})
    got = read_all(ShardReader([path]))
    bad = {r.key: r.reason for r in got if isinstance(r, Skipped)}
    assert bad == {"row 3": "missing image", "row 6": "truncated image"}
    assert [r.caption for r in got if not isinstance(r, Skipped)] == [f"a red circle {i}" for i in (0, 1, 2, 4, 5, 7,
                                                                                                   8, 9)]
    assert got[0].name == f"{path}:row 0" and got[0].image == images[0] and got[0].hw == (32, 32)


def test_hugging_face_image_structs_read_bytes_or_the_path_beside_the_file(tmp_path):
    """A HF `datasets` image column: structs {bytes, path}; null bytes mean the file at path (relative to the
    Parquet file's folder). The caption comes from a column named by the caption rule (json:text)."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "b.png").write_bytes(jpeg(1, fmt="PNG"))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": jpeg(0), "path": "a.jpg"}, {"bytes": None, "path": "imgs/b.png"},
                       {"bytes": None, "path": "imgs/gone.jpg"}, None], struct)
    path = write_parquet(tmp_path / "train-00000-of-00001.parquet",
                         {"image": images, "text": ["one", "two", "three", "four"], "id": [0, 1, 2, 3]})
    got = read_all(ShardReader([path], caption=parse_rule("json:text")))
    assert [r.caption for r in got[:2]] == ["one", "two"] and got[1].image == jpeg(1, fmt="PNG")
    assert isinstance(got[2], Skipped) and got[2].reason == "missing image" and "imgs/gone.jpg" in got[2].detail
    assert isinstance(got[3], Skipped) and got[3].reason == "missing image" and "null" in got[3].detail


def test_a_damaged_row_group_skips_its_rows_by_row_group_and_the_rest_reads(tmp_path, caplog):
    """A local file's row group that does not decode: its rows are skipped naming the row group, at once (a local
    read is not retried as if the network had failed), and the other row groups read."""
    path = write_parquet(tmp_path / "d.parquet", {"jpg": pa.array([jpeg(i) for i in range(8)], pa.binary()),
                                                  "txt": [f"c {i}" for i in range(8)]})
    data = bytearray((tmp_path / "d.parquet").read_bytes())
    start = pq.ParquetFile(path).metadata.row_group(0).column(0).data_page_offset
    data[start + 16:start + 48] = bytes(b ^ 0xFF for b in data[start + 16:start + 48])  # its first page header
    (tmp_path / "d.parquet").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        got = read_all(ShardReader([path]))
    assert [r.key for r in got if isinstance(r, Skipped)] == [f"row {i}" for i in range(4)]
    assert all(r.reason == "unreadable shard" and r.detail.startswith("row group 0: ") for r in got[:4])
    assert [r.caption for r in got[4:]] == [f"c {i}" for i in range(4, 8)]
    assert "retrying" not in caplog.text


def test_parquet_without_images_is_refused_with_what_it_holds(tmp_path, caplog):
    """Recap-DataComp-1B's metadata (URLs and captions, no images) and a listing of image paths: both refused with
    the way forward (img2dataset to download; the converter for a listing); no sample is read from them."""
    recap = write_parquet(tmp_path / "recap.parquet", {
        "url": ["http://x/1.jpg"], "re_caption": ["a long caption"], "org_caption": ["c"], "sha256": ["0" * 64],
        "key": ["000"]})
    listing = write_parquet(tmp_path / "listing.parquet", {"file_name": ["a.jpg"], "caption": ["c"]})
    reader = ShardReader([recap, listing])
    with caplog.at_level(logging.WARNING):
        from genlip_fast.data.reader import SkipCounter

        skipped = SkipCounter()
        assert reader.count(0, skipped) == 0 and reader.count(1, skipped) == 0
    assert skipped.bad_shards == [recap, listing]
    assert "holds no images, only their URLs (column 'url'" in caplog.text and "img2dataset --url_list" in caplog.text
    assert "holds image paths (column 'file_name')" in caplog.text and "genlip_fast.data.convert" in caplog.text
    bad = write_parquet(tmp_path / "bad.parquet", {"a": [b"x"], "b": [b"y"]})
    reader = ShardReader([bad])
    reader.count(0)
    assert "several columns could hold images (a, b)" in reader._bad[0]
    (tmp_path / "junk.parquet").write_text("not parquet")
    reader = ShardReader([str(tmp_path / "junk.parquet")])
    assert reader.count(0) == 0 and "not a readable Parquet file" in reader._bad[0]


def parquet_shards(root, n_files=3, rows=10, row_group_size=4):
    root.mkdir(exist_ok=True)
    return [write_parquet(root / f"part-{f:05d}.parquet", {
        "jpg": pa.array([jpeg(f * 100 + i) for i in range(rows)], pa.binary()),
        "caption": [f"a red circle {f} {i} ." for i in range(rows)]}, row_group_size=row_group_size)
        for f in range(n_files)]


def test_parquet_stream_resumes_exactly(tmp_path):
    """Sample i of a file is row i: a saved position continues with the very packs an unbroken stream makes."""
    parquet_shards(tmp_path)
    cfg = DataConfig(train_shards=str(tmp_path / "*.parquet"), backend="host", image_size=32, batch_size=4,
                     num_threads=1, pack_tokens=64, caption="json:caption", shuffle_shards=2)
    whole = build_data_loader(cfg, TOK, epochs=1)
    keys = [p.keys for p in whole]
    assert sorted(k for ks in keys for k in ks) == sorted(f"{tmp_path}/part-{f:05d}.parquet:row {i}"
                                                         for f in range(3) for i in range(10))
    first = build_data_loader(cfg, TOK, epochs=1)
    head = [next(first).keys for _ in range(3)]
    state = first.state_dict()
    first.close()
    rest = build_data_loader(cfg, TOK, epochs=1)
    rest.load_state_dict(state)
    assert head + [p.keys for p in rest] == keys


def test_tiny_preset_trains_from_parquet_and_resumes_exactly(shapes, tmp_path):
    """The demo's shards rewritten as img2dataset-style Parquet files (key, jpg, txt): the tiny preset trains from
    them, and a run stopped after 2 steps continues to the same losses as one that never stopped."""
    from genlip_fast.data.webdataset import iter_shard
    from tiny_run import tiny_config
    from genlip_fast.train.trainer import train

    data = tmp_path / "pq"
    data.mkdir()
    for n, shard in enumerate(sorted(shapes.glob("train-*.tar"))):
        rows = list(iter_shard(shard))
        write_parquet(data / f"{n:05d}.parquet", {"key": [k for k, _ in rows], "jpg": [f["jpg"] for _, f in rows],
                                                  "txt": [f["txt"].decode() for _, f in rows]}, row_group_size=16)
    over = dict(steps=4, data__train_shards=str(data / "*.parquet"))
    straight = train(tiny_config(data, tmp_path / "a", **over), progress=False)["losses"]
    first = train(tiny_config(data, tmp_path / "b", train__stop_at_step=2, **over), progress=False)["losses"]
    second = train(tiny_config(data, tmp_path / "b", **over), progress=False)["losses"]
    assert len(straight) == 4 and first + second == straight


# -- the converter ------------------------------------------------------------------------------------------------
def shard_samples(res) -> list[dict]:
    """Every sample of the converter's shards: its members (``txt`` decoded, ``json`` parsed)."""
    from genlip_fast.data.webdataset import iter_shard

    out = []
    for shard in res["shards"]:
        for _, f in iter_shard(shard):
            out.append({**f, "txt": f["txt"].decode(), **({"json": json.loads(f["json"])} if "json" in f else {})})
    return out


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_convert_llava_json_array_with_images_elsewhere(tmp_path, caplog):
    """LLaVA pretraining JSON: one array of {id, image, conversations}; images under --images, not beside the JSON.
    Bad records are left out, counted, and logged with the file and the record's number."""
    from genlip_fast.data.convert import convert

    (tmp_path / "images" / "00000").mkdir(parents=True)
    for i in range(4):
        (tmp_path / "images" / "00000" / f"{i}.jpg").write_bytes(jpeg(i))
    turns = lambda cap: [{"from": "human", "value": "<image>\nDescribe the image."},  # noqa: E731
                         {"from": "gpt", "value": cap}]
    records = [{"id": "0", "image": "00000/0.jpg", "conversations": turns("a dog on a beach")},
               {"id": "1", "image": "00000/1.jpg", "conversations": [{"role": "user", "content": "hi"},
                                                                    {"role": "assistant", "content": "a cat"}]},
               {"id": "2", "image": "00000/2.jpg", "conversations": [{"from": "human", "value": "<image>"}]},
               {"id": "3", "image": "00000/missing.jpg", "conversations": turns("gone")},
               "not a record",
               {"id": "5", "image": "00000/3.jpg", "conversations": turns("a red bus")},
               {"id": "6", "image": "00000/3.jpg", "conversations": turns("a first reply") + [
                   {"from": "human", "value": "<image>\nAnd now?"}, {"from": "gpt", "value": "<image> the last one"}]}]
    src = tmp_path / "meta" / "blip_laion_cc_sbu_558k.json"
    src.parent.mkdir()
    src.write_text(json.dumps(records))
    before = snapshot(tmp_path)
    with caplog.at_level(logging.WARNING):
        res = convert(src, tmp_path / "out", images=tmp_path / "images")
    assert res["samples"] == 4
    assert res["skipped"] == {"missing caption": 1, "unreadable file": 1, "not a record": 1}
    got = shard_samples(res)
    # a conversation's caption is the reply the loader's conv rule takes: the last one, placeholders removed
    assert [s["txt"] for s in got] == ["a dog on a beach", "a cat", "a red bus", "the last one"]
    assert got[0]["jpg"] == jpeg(0) and got[0]["json"] == records[0]  # the whole record kept beside the caption
    assert f"skipping record 2 in {src}: missing caption" in caplog.text
    assert f"skipping record 3 in {src}: unreadable file" in caplog.text and "missing.jpg" in caplog.text
    assert snapshot(tmp_path / "images") == {p: b for p, b in before.items() if "images" in p.parts}


def test_convert_coco_captions_joined_to_their_images(tmp_path):
    """COCO keeps annotations/ beside train2017/: --images says where the file names start; one sample per caption
    or the first caption of each image."""
    from genlip_fast.data.convert import convert

    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    (tmp_path / "coco" / "annotations").mkdir()
    for i in (1, 2, 3):
        (tmp_path / "coco" / "train2017" / f"{i:012d}.jpg").write_bytes(jpeg(i))
    body = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3)],
            "annotations": [{"id": 10, "image_id": 2, "caption": "two birds"},
                            {"id": 11, "image_id": 1, "caption": "a train"},
                            {"id": 12, "image_id": 2, "caption": "birds on a wire"},
                            {"id": 13, "image_id": 99, "caption": "no such image"}]}
    src = tmp_path / "coco" / "annotations" / "captions_train2017.json"
    src.write_text(json.dumps(body))
    every = convert(src, tmp_path / "all", images=tmp_path / "coco" / "train2017")
    assert [(s["txt"], s["jpg"] == jpeg(s["json"]["image"]["id"])) for s in shard_samples(every)] == [
        ("a train", True), ("two birds", True), ("birds on a wire", True)]
    assert every["skipped"] == {"missing caption": 1}  # image 3 has no caption
    first = convert(src, tmp_path / "first", images=tmp_path / "coco" / "train2017", captions="first")
    assert [s["txt"] for s in shard_samples(first)] == ["a train", "two birds"]


def test_convert_tsv_csv_jsonl_and_parquet_listings(tmp_path):
    """open_clip's filepath<TAB>title, another separator, JSONL whose caption is a list (never its Python text),
    and Parquet listings of local paths or of the images themselves."""
    from genlip_fast.data.convert import convert

    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(jpeg(i, fmt="PNG"))
    (tmp_path / "train.tsv").write_text("filepath\ttitle\n" + "".join(f"img/{i}.png\ta photo, number {i}\n"
                                                                     for i in range(3)))
    res = convert(tmp_path / "train.tsv", tmp_path / "tsv")
    assert [s["txt"] for s in shard_samples(res)] == [f"a photo, number {i}" for i in range(3)]
    assert shard_samples(res)[1]["png"] == jpeg(1, fmt="PNG")
    (tmp_path / "semi.txt").write_text("path;text\n" + "".join(f"{tmp_path}/img/{i}.png;cap {i}\n" for i in range(3)))
    assert convert(tmp_path / "semi.txt", tmp_path / "semi", separator=";")["samples"] == 3  # absolute paths
    rows = [{"image": "img/0.png", "caption": ["first of two", "second of two"]},
            {"image": "img/1.png", "caption": {"en": "a dict is no caption"}},
            {"image": "img/2.png", "caption": "plain"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    res = convert(tmp_path / "list.jsonl", tmp_path / "jsonl")
    assert [s["txt"] for s in shard_samples(res)] == ["first of two", "second of two", "plain"]
    assert res["skipped"] == {"caption is not text": 1, "not a record": 1}
    res = convert(tmp_path / "list.jsonl", tmp_path / "jsonl1", captions="first")
    assert [s["txt"] for s in shard_samples(res)] == ["first of two", "plain"]
    write_parquet(tmp_path / "paths.parquet", {"file_name": [f"img/{i}.png" for i in range(3)],
                                               "text": [f"p{i}" for i in range(3)]})
    res = convert(tmp_path / "paths.parquet", tmp_path / "pq_paths")
    assert [s["txt"] for s in shard_samples(res)] == ["p0", "p1", "p2"]
    write_parquet(tmp_path / "bytes.parquet", {"jpg": pa.array([jpeg(5), b"garbage bytes"], pa.binary()),
                                               "caption": ["b0", "b1"]})
    res = convert(tmp_path / "bytes.parquet", tmp_path / "pq_bytes")
    assert [s["txt"] for s in shard_samples(res)] == ["b0"] and res["skipped"] == {"not an image": 1}


def test_convert_refuses_what_it_cannot_use_in_one_line(tmp_path, capsys):
    from genlip_fast.data.convert import main

    (tmp_path / "x.json").write_text(json.dumps({"info": {}, "licenses": []}))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "nope.jpg", "caption": "c"}) + "\n")
    (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
    cases = {"x.json": "neither a JSON array of records", "bad.jsonl": "no usable record (unreadable file: 1",
             "cols.csv": "no image column among the usual names"}
    for name, message in cases.items():
        assert main([str(tmp_path / name), str(tmp_path / f"out-{name}")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("python -m genlip_fast.data.convert: error: ") and message in err[0]
        assert str(tmp_path / name) in err[0]
    (tmp_path / "img.jpg").write_bytes(jpeg(0))
    (tmp_path / "ok.jsonl").write_text(json.dumps({"image": "img.jpg", "caption": "c"}) + "\n")
    (tmp_path / "file").write_text("a file where the output folder should be")
    for args, message in ((["out", "--per-shard", "0"], "--per-shard must be at least 1"), (["file/out"], "file/out")):
        assert main([str(tmp_path / "ok.jsonl"), *[str(tmp_path / args[0]), *args[1:]]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("python -m genlip_fast.data.convert: error: ") and message in err[0]
    assert main([str(tmp_path / "ok.jsonl"), str(tmp_path / "out")]) == 0
    written = snapshot(tmp_path / "out")
    assert main([str(tmp_path / "ok.jsonl"), str(tmp_path / "out")]) == 2  # never over existing shards
    assert "already holds train-*.tar shards" in capsys.readouterr().err and snapshot(tmp_path / "out") == written
