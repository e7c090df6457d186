"""Shards, their index, the converter, the record checks and the stage-2 grid (no DALI)."""

import io
import json

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from genlip_fast.data.convert import convert
from genlip_fast.data.captions import parse_rule
from genlip_fast.data.reader import ShardReader, check_fields
from genlip_fast.data.storage import open_source
from genlip_fast.data.transforms import BadImage, check_grid_limits, jpeg_size, probe_image, stage2_grid
from genlip_fast.data.webdataset import load_index, read_members, scan_shard, write_shard


def image_bytes(w, h, fmt="JPEG", seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([(16, 1024), (4, 64), (64, 256)]))
@example(1, 2000, (16, 1024))
@example(2000, 1, (16, 1024))
@example(1, 1, (16, 1024))
@example(99, 4962, (16, 1024))  # 5 rows; 226 columns would exceed 1024 patches, so the long side is clamped to 204
def test_stage2_grid_is_valid_for_any_aspect_ratio(h, w, limits):
    lo, hi = limits
    check_grid_limits(lo, hi)
    gh, gw = (int(x) for x in stage2_grid(h, w, patch=16, min_patches=lo, max_patches=hi))
    assert gh >= 1 and gw >= 1 and lo <= gh * gw <= hi
    if h > w:
        assert gh >= gw
    elif w > h:
        assert gw >= gh
    # aspect kept as closely as whole patches allow: each side is off by at most half a patch, unless the long side
    # was clamped to keep the product in range (one patch more or less would leave it)
    gs, gl = min(gh, gw), max(gh, gw)
    if gs > 1 and lo <= gs * (gl - 1) and gs * (gl + 1) <= hi:
        err = abs(np.log(gh / gw) - np.log(h / w))
        assert err <= np.log((gs + 0.5) / (gs - 0.5)) + np.log((gl + 0.5) / (gl - 0.5)) + 1e-4


def test_grid_limits_that_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="too narrow"):
        check_grid_limits(1000, 1024)
    with pytest.raises(ValueError, match="min_patches"):
        check_grid_limits(0, 10)


def test_index_sidecar_matches_the_tar_and_reads_any_sample(tmp_path):
    samples = [(f"k{i}", {"jpg": image_bytes(20 + i, 18), "txt": f"cap {i}".encode()}) for i in range(5)]
    path = tmp_path / "a.tar"
    write_shard(path, samples)
    side = json.loads((tmp_path / "a.tar.idx").read_text())
    assert side["num_samples"] == 5
    idx = load_index(path)
    assert idx == scan_shard(path)
    src = open_source(str(path))
    key, members = idx[3]
    assert key == "k3" and read_members(src, members) == samples[3][1]
    src.close()
    (tmp_path / "b.tar").write_bytes(path.read_bytes())  # no sidecar: indexed by scanning headers
    assert load_index(tmp_path / "b.tar") == idx


@pytest.mark.parametrize("data,reason", [
    (b"hello, this is a caption not an image", "not an image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 100 + b"junk" * 50, "truncated image"),
    (b"GIF89a" + b"\x00" * 64, "unsupported format"),
])
def test_probe_rejects_bad_bytes(data, reason):
    with pytest.raises(BadImage) as e:
        probe_image(data)
    assert e.value.reason == reason


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from(["RGB", "L", "CMYK"]),
       st.sampled_from([dict(), dict(progressive=True), dict(optimize=True, subsampling=0), dict(quality=20),
                        dict(exif=b"Exif\x00\x00MM\x00*" + b"\x00" * 64, icc_profile=b"\x00" * 300)]))
def test_jpeg_size_from_markers_agrees_with_pillow(w, h, mode, options):
    """The marker walk behind probe_image's JPEG path reads the size Pillow reads (baseline, progressive, grey,
    CMYK, EXIF and ICC segments), and gives up (Pillow then decides) on a header cut short."""
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="JPEG", **options)
    data = buf.getvalue()
    assert jpeg_size(data) == (h, w) and probe_image(data)[1:] == (h, w)
    sos = data.index(b"\xff\xda")
    for cut in (3, sos // 2, sos):
        assert jpeg_size(data[:cut]) is None


def test_probe_reads_sizes_and_catches_truncation():
    for fmt in ("JPEG", "PNG", "WEBP"):
        data = image_bytes(37, 21, fmt)
        assert probe_image(data)[1:] == (21, 37)
        with pytest.raises(BadImage, match="truncated|corrupt"):
            probe_image(data[: len(data) // 2])
    fields = {"jpg": image_bytes(40, 30), "json": json.dumps({"meta": {"caption": " a dog "}}).encode()}
    rule = parse_rule("json:meta.caption")
    assert check_fields(fields, stage=1, patch=16, rule=rule)[1:] == ("a dog", None, (30, 40))
    with pytest.raises(BadImage, match="missing caption"):
        check_fields(fields, stage=1, patch=16)  # auto looks for json caption, not meta.caption
    with pytest.raises(BadImage, match="smaller than a patch"):
        check_fields({"jpg": image_bytes(8, 8), "txt": b"x"}, stage=2, patch=16)
    check_fields({"jpg": image_bytes(2000, 1), "txt": b"x"}, stage=2, patch=16)  # a strip is fine in stage 2


def test_converter_from_folder_and_lists(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"im{i}.png").write_bytes(image_bytes(30, 20, "PNG", i))
        if i != 3:
            (src / f"im{i}.txt").write_text(f"a red circle {i}" if i != 4 else "   ")
    (src / "bad.jpg").write_bytes(b"not really a jpeg at all, just text")
    (src / "bad.txt").write_text("caption")
    res = convert(src, tmp_path / "out", per_shard=2)
    assert res["samples"] == 3 and res["skipped"] == {"missing caption": 1, "empty caption": 1, "not an image": 1}
    assert len(res["shards"]) == 2 and all((tmp_path / "out" / (p.split("/")[-1] + ".idx")).is_file()
                                           for p in res["shards"])
    reader = ShardReader(res["shards"])
    got = sorted(reader.read(s, j).caption for s in range(len(res["shards"])) for j in range(reader.count(s)))
    assert got == ["a red circle 0", "a red circle 1", "a red circle 2"]

    # captions from a field of the .json beside each image, as data.caption_field reads it: a text or skipped
    side = tmp_path / "side"
    side.mkdir()
    for i, value in enumerate(["a text", ["a", "list"], None]):
        (side / f"im{i}.png").write_bytes(image_bytes(30, 20, "PNG", i))
        (side / f"im{i}.json").write_text(json.dumps({"meta": {"caption": value}}))
    res = convert(side, tmp_path / "out-side", caption_field="meta.caption")
    assert res["samples"] == 1 and res["skipped"] == {"missing caption": 2}
    assert ShardReader(res["shards"]).read(0, 0).caption == "a text"

    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps({"image": f"src/im{i}.png", "caption": f"c{i}"})
                                                   for i in range(5)))
    assert convert(tmp_path / "list.jsonl", tmp_path / "out2")["samples"] == 5
    (tmp_path / "list.csv").write_text("path,text\n" + "".join(f"src/im{i}.png,c{i}\n" for i in range(5)))
    assert convert(tmp_path / "list.csv", tmp_path / "out3", image_col="path", caption_col="text")["samples"] == 5
