"""The data stream at scale: lazy shard indexes and the manifest, mixing across open shards, exact positions, a
different number of streams on resume, bad shards, rate-limited skip logs, pinned packs (issue 12, issue 15 item 11).
"""

import io
import itertools
import logging
import re
import shutil
import threading
import time
import tracemalloc
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import genlip_fast.data.reader as reader_mod
from genlip_fast.data.batch import PackedBatch
from genlip_fast.data.config import DataConfig
from genlip_fast.data.manifest import build_manifest, dataset_size, read_manifest, update_manifest
from genlip_fast.data.pipeline import build_data_loader
from genlip_fast.data.prefetch import DataWaitInterrupted
from genlip_fast.data.sampler import (
    EmptyDatasetError,
    NoUsableSampleError,
    PassWatch,
    ShardSampler,
    initial_state,
    remap_states,
)
from genlip_fast.data.tokenizer import load_tokenizer
from genlip_fast.data.webdataset import write_shard
from tiny_run import recap_layout_shard

TOK = load_tokenizer("demo")


def tiny_jpeg(seed: int, w: int = 32, h: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=70)
    return buf.getvalue()


def make_shards(root, n_shards: int, per_shard: int, *, prefix: str = "s") -> list[str]:
    """``n_shards`` real shards of ``per_shard`` 32x32 samples; keys name their shard (``s003k0002``)."""
    paths = []
    for s in range(n_shards):
        samples = [(f"{prefix}{s:03d}k{i:04d}", {"jpg": tiny_jpeg(s * 1000 + i), "txt": b"a red circle ."})
                   for i in range(per_shard)]
        p = root / f"{prefix}-{s:06d}.tar"
        write_shard(p, samples)
        paths.append(str(p))
    return paths


def config(root, **kw) -> DataConfig:
    kw.setdefault("pack_tokens", 128)  # 4 patches + ~7 caption tokens = 11 tokens: 11 samples per pack
    return DataConfig(train_shards=str(root / "*.tar"), backend="host", image_size=32, batch_size=8, num_threads=1,
                      **kw)


def keys_of(pack) -> list[str]:
    return [k.split(":")[-1] for k in pack.keys]


# -- sampler ------------------------------------------------------------------------------------------------------
def drain(sampler, n=None):
    out = []
    for sid in sampler:
        out.append(sid)
        if n is not None and len(out) == n:
            break
    return out


def samplers(counts, streams, lanes, seed=0, epochs=1):
    return [ShardSampler(len(counts), counts.__getitem__, initial_state(seed=seed, stream=s, streams=streams,
                                                                        lanes_per_stream=lanes),
                         seed=seed, epochs=epochs) for s in range(streams)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=9), st.integers(1, 3), st.integers(1, 5),
       st.integers(1, 2))
def test_every_sample_once_per_epoch_across_streams(counts, streams, lanes, epochs):
    everything = Counter({(s, i): epochs for s, c in enumerate(counts) for i in range(c)})
    seen = Counter(x for smp in samplers(counts, streams, lanes, epochs=epochs) for x in drain(smp))
    assert seen == everything


def test_a_stream_mixes_its_open_shards():
    counts = [50] * 40
    first = drain(samplers(counts, 1, 16, epochs=None)[0], 64)
    # reading one shard after the other, 64 samples would come from 2 shards
    assert len({s for s, _ in first}) >= 12


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=8), st.integers(1, 3), st.integers(1, 4),
       st.integers(0, 60))
def test_position_restores_exactly(counts, streams, lanes, cut):
    for a in samplers(counts, streams, lanes, epochs=3):
        head = drain(a, cut)
        b = ShardSampler(len(counts), counts.__getitem__, a.state_dict(), seed=0, epochs=3)
        rest_b = drain(b)
        assert head + rest_b == drain(samplers(counts, streams, lanes, epochs=3)[a.key[1]])


def test_no_per_sample_order_is_materialised():
    """10M samples in 2,000 shards: drawing from a stream allocates a few permutations (KB), never the epoch's
    order (a per-sample order would be >= 160 MB)."""
    counts = [5000] * 2000
    tracemalloc.start()
    smp = samplers(counts, 8, 16, epochs=None)[3]
    drain(smp, 2000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB"


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 10), min_size=1, max_size=8), st.integers(1, 4), st.integers(1, 4),
       st.integers(1, 3), st.integers(1, 4), st.integers(0, 40))
def test_remapped_streams_read_every_sample_once_per_epoch(counts, old_streams, new_streams, lanes, new_lanes,
                                                          cut):
    """Positions saved by ``old_streams`` streams continued by ``new_streams``: over the two epochs, every sample
    is read exactly twice (once per epoch) — nothing skipped, nothing repeated."""
    epochs = 2
    old = samplers(counts, old_streams, lanes, epochs=epochs)
    seen = Counter(x for smp in old for x in drain(smp, cut))
    states = [smp.state_dict() for smp in old]
    for s in range(new_streams):
        state = remap_states(states, stream=s, streams=new_streams, lanes_per_stream=new_lanes, seed=0)
        seen.update(drain(ShardSampler(len(counts), counts.__getitem__, state, seed=0, epochs=epochs)))
    assert seen == Counter({(s, i): epochs for s, c in enumerate(counts) for i in range(c)})


def test_empty_dataset_is_an_error_not_a_hang():
    smp = samplers([0, 0, 0], 1, 4, epochs=None)[0]
    with pytest.raises(EmptyDatasetError, match="none of the 3 shards"):
        next(smp)


def epoch_share(counts, stream, streams, lanes, epoch) -> set:
    """The samples stream ``stream`` draws in epoch ``epoch``: its lanes started at that epoch, run through it."""
    state = initial_state(stream=stream, streams=streams, lanes_per_stream=lanes)
    for lane in state["lanes"]:
        lane[2] = epoch
    return set(drain(ShardSampler(len(counts), counts.__getitem__, state, seed=0, epochs=epoch + 1)))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=6).filter(any), st.integers(1, 3), st.integers(1, 4),
       st.integers(1, 40))
def test_a_whole_pass_is_every_sample_of_the_streams_share_of_an_epoch(counts, streams, lanes, mark):
    """The watch says "a whole pass" only once the stream has drawn, after the last usable sample (marked after
    draw ``mark``), every sample of its share of one epoch — so a stream that sees no usable sample in one holds
    none (from a stream's start: once its first epoch is read)."""
    for stream, smp in enumerate(samplers(counts, streams, lanes, epochs=None)):
        watch = PassWatch(smp)
        first = epoch_share(counts, stream, streams, lanes, 0)
        since = []
        while not watch.passed():
            since.append(next(smp))
        assert first <= set(since)
        drain(smp, mark)
        watch.usable(smp.state_dict())
        since = []
        while not watch.passed():
            assert len(since) <= 50 * (sum(counts) + lanes)  # it ends (lanes with empty parts race ahead)
            since.append(next(smp))
        epochs = {e for e in range(smp.lanes[0][2] + 1) if epoch_share(counts, stream, streams, lanes, e) <= set(since)}
        assert epochs, since


# -- manifest and start-up ----------------------------------------------------------------------------------------
def test_convert_and_generator_write_the_manifest_and_the_command_rebuilds_it(tmp_path, capsys):
    from genlip_fast.data.manifest import main
    from genlip_fast.data.synthetic import generate_shards

    generate_shards(tmp_path / "gen", num_train=30, num_val=4, per_shard=20, size=32)
    m = read_manifest(tmp_path / "gen")
    assert {k: v["samples"] for k, v in m.items()} == {"train-000000.tar": 20, "train-000001.tar": 10,
                                                       "val-000000.tar": 4}
    assert all(v["bytes"] == (tmp_path / "gen" / k).stat().st_size for k, v in m.items())
    other = tmp_path / "other"
    other.mkdir()
    for p in (tmp_path / "gen").glob("train-*.tar"):
        shutil.copy(p, other / p.name)  # shards from elsewhere: no manifest, no index sidecar
    (other / "broken.tar").write_text("not a tar at all")
    assert dataset_size([str(p) for p in sorted(other.glob("*.tar"))])[2] == [str(other)]
    main([str(other)])
    m = read_manifest(other)
    assert m["train-000001.tar"]["samples"] == 10 and m["broken.tar"]["samples"] == 0 and "error" in m["broken.tar"]
    assert dataset_size([str(p) for p in sorted(other.glob("*.tar"))]) == (30, 3, [])
    # img2dataset's NNNNN.parquet beside each NNNNN.tar is metadata, not a shard: not listed (nor counted as bad)
    (other / "train-000000.parquet").write_bytes(b"URLs and captions")
    (other / "standalone.parquet").write_bytes(b"not parquet")
    res = build_manifest(other)
    assert sorted(read_manifest(other)) == ["broken.tar", "standalone.parquet", "train-000000.tar",
                                            "train-000001.tar"]
    assert res["bad"] == ["broken.tar", "standalone.parquet"]
    # a folder without shards (mistyped, or the shards one level down) is one error line; nothing is written there
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "nowhere"):
        assert main([str(folder)]) == 2
        assert capsys.readouterr().err == (f"python -m genlip_fast.data.manifest: error: no shard in {str(folder)!r} "
                                           "(.tar or .parquet files directly in it)\n")
    assert not any((tmp_path / "empty").iterdir()) and not (tmp_path / "nowhere").exists()


def test_start_up_reads_no_shard_index_and_2000_shards_start_fast(tmp_path, monkeypatch):
    one = make_shards(tmp_path / "src", 1, 3)[0]
    data = tmp_path / "many"
    data.mkdir()
    body = open(one, "rb").read()
    for s in range(2000):
        (data / f"s-{s:06d}.tar").write_bytes(body)
    update_manifest(data, {f"s-{s:06d}.tar": {"samples": 3, "bytes": len(body)} for s in range(2000)})
    opened = []
    real = reader_mod.load_index
    monkeypatch.setattr(reader_mod, "load_index", lambda p: opened.append(p) or real(p))
    cfg = config(data, shuffle_shards=16)
    t0 = time.perf_counter()
    loader = build_data_loader(cfg, TOK)
    elapsed = time.perf_counter() - t0
    assert opened == [] and elapsed < 0.5, (len(opened), elapsed)
    next(loader)  # now the stream opens its shards, 16 at a time
    loader.close()
    assert 1 <= len(set(opened)) <= 16 + 4


# -- bad shards and bad records ------------------------------------------------------------------------------------
def test_a_bad_shard_is_skipped_counted_and_logged_with_its_path(tmp_path, caplog):
    make_shards(tmp_path, 3, 4)
    (tmp_path / "s-000001.tar").unlink()
    (tmp_path / "s-000001.tar").write_text("this is a text file, not a tar")  # no index sidecar to fall back on
    (tmp_path / "s-000001.tar.idx").unlink()
    broken = bytearray((tmp_path / "s-000002.tar").read_bytes())
    broken[100:140] = b"\x00garbage in the header\x00" * 2  # a broken first header (bad checksum)
    (tmp_path / "s-000002.tar").write_bytes(bytes(broken))
    (tmp_path / "s-000002.tar.idx").unlink()
    with caplog.at_level(logging.WARNING):
        loader = build_data_loader(config(tmp_path, shuffle_shards=2), TOK, epochs=1)
        keys = sorted(k for p in loader for k in keys_of(p))
    assert keys == [f"s000k{i:04d}" for i in range(4)]
    assert loader.stats["bad_shards"] == 2 and loader.stats["skipped_total"] == 0
    assert "s-000001.tar" in caplog.text and "s-000002.tar" in caplog.text


def test_samples_are_the_packs_samples_one_by_one_and_bad_input_is_skipped_alike(tmp_path):
    """The sample-level view of a stream (held-out captions are read through it): the very samples the stream's
    packs hold, in the order the packer takes them, decoded and tokenised alike; a bad shard and a bad record are
    skipped and counted as for packs; reading them does not move the stream."""
    from genlip_fast.data import pack_samples

    make_shards(tmp_path, 3, 5)
    (tmp_path / "s-000001.tar").write_text("not a tar")
    (tmp_path / "s-000001.tar.idx").unlink()
    write_shard(tmp_path / "s-000003.tar", [("s003k0000", {"jpg": b"not an image", "txt": b"x"}),
                                             ("s003k0001", {"jpg": tiny_jpeg(7), "txt": b"a blue square ."})])
    cfg = config(tmp_path, shuffle_shards=2)
    loader = build_data_loader(cfg, TOK, epochs=1)
    samples = list(loader.samples())
    assert loader.stats["bad_shards"] == 1 and loader.stats["skipped"] == {"not an image": 1}
    packs = list(build_data_loader(cfg, TOK, epochs=1))
    assert [s.key for s in samples] == [k for p in packs for k in p.keys] and len(samples) == 11
    by_key = {s.key: s for s in samples}
    for p in packs:
        direct = pack_samples([by_key[k] for k in p.keys], max_tokens=cfg.pack_tokens)
        for name in ("patches", "input_ids", "cu_seqlens", "grid_hw", "targets"):
            assert torch.equal(getattr(p, name), getattr(direct, name)), name
    assert [s.key for s in itertools.islice(loader.samples(), 4)] == [s.key for s in samples[:4]]
    loader.close()


def test_no_readable_shard_is_one_clear_error(tmp_path):
    for s in range(2):
        (tmp_path / f"s-{s:06d}.tar").write_text("not a tar")
    loader = build_data_loader(config(tmp_path), TOK)
    with pytest.raises(EmptyDatasetError, match=r"none of the 2 shards.*2 cannot be read.*s-000000\.tar"):
        next(loader)
    loader.close()


def corrupt_jpeg(i: int) -> bytes:
    return b"\xff\xd8\xff\xe0" + bytes((i + j) % 256 for j in range(300)) + b"\xff\xd9"


def guard(loader, seconds: float = 60.0):
    """A loader whose ``next()`` gives up after ``seconds`` (DataWaitInterrupted) instead of hanging a test run."""
    deadline = time.monotonic() + seconds
    loader.interrupt = lambda: time.monotonic() > deadline
    return loader


def test_a_pass_without_a_usable_sample_is_one_clear_error_in_bounded_memory(tmp_path):
    """Before: every record skipped -> the loader read on forever, keeping every skipped record (18 GB after 10
    minutes on a 48-sample shard). Now: one pass, then an error naming the shards and the skips by reason."""
    recap_layout_shard(tmp_path / "s-000000.tar", 48)
    write_shard(tmp_path / "s-000001.tar", [(f"x{i:04d}", {"jpg": corrupt_jpeg(i), "txt": b"a cross ."})
                                             for i in range(16)])
    loader = guard(build_data_loader(config(tmp_path, shuffle_shards=4), TOK))
    tracemalloc.start()
    try:
        with pytest.raises(NoUsableSampleError) as err:
            next(loader)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        loader.close()
    msg = str(err.value)
    assert isinstance(err.value, EmptyDatasetError)
    assert msg.startswith(f"no usable sample in a whole pass over the data: 2 shards of 64 samples "
                          f"({tmp_path / 's-000000.tar'}, {tmp_path / 's-000001.tar'}), ")
    skips = {reason: int(n) for n, reason in re.findall(r"(\d+) (missing caption|corrupt image) \(", msg)}
    assert skips["missing caption"] >= 48 and skips["corrupt image"] >= 16 and "\n" not in msg  # a pass or more
    assert ("missing caption (looked for txt, json conversations (last assistant turn), json caption, json text; "
            "data.caption says where)") in msg
    assert peak < 32 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_a_stream_whose_share_of_an_epoch_is_unusable_says_so_though_other_streams_have_samples(tmp_path):
    """Two streams of one lane each over a good and a bad shard: the stream dealt the bad shard in epoch 0 has gone a
    whole pass without a sample (its rank would hold every other one up for that long) and raises, naming itself,
    though epoch 1 deals it the good shard (seed 0); the other stream streams on."""
    make_shards(tmp_path, 1, 6)
    recap_layout_shard(tmp_path / "s-000001.tar", 6)
    errors, packs = {}, {}
    for rank in range(2):
        loader = guard(build_data_loader(config(tmp_path, shuffle_shards=1, pack_tokens=64), TOK, rank=rank,
                                         world_size=2))
        try:
            packs[rank] = keys_of(next(loader))  # 5 samples: less than a pass
        except NoUsableSampleError as e:
            errors[rank] = str(e)
        loader.close()
    (bad, msg), = errors.items()
    assert len(packs) == 1 and all(k.startswith("s000") for k in packs[1 - bad])
    assert msg.startswith(f"no usable sample in a whole pass over data stream {bad} of 2: 1 shard of 6 samples "
                          f"({tmp_path / 's-000001.tar'}), ")


def test_a_few_usable_samples_among_many_bad_ones_still_stream_and_resume_exactly(tmp_path):
    """3 good records among 150 bad ones: no pass goes without a usable sample, so the stream goes on (11 samples a
    pack: about 4 epochs a pack), and a saved position continues exactly."""
    samples = [(f"bad{i:04d}", {"jpg": b"not an image", "txt": b"x"}) for i in range(150)]
    samples += [(f"good{i}", {"jpg": tiny_jpeg(i), "txt": b"a cross ."}) for i in range(3)]
    write_shard(tmp_path / "s-000000.tar", samples)
    cfg = config(tmp_path, shuffle_shards=4)
    a = guard(build_data_loader(cfg, TOK))
    first = next(a)
    state = a.state_dict()
    rest = [next(a) for _ in range(2)]
    a.close()
    assert {k for p in [first, *rest] for k in keys_of(p)} == {"good0", "good1", "good2"}
    b = guard(build_data_loader(cfg, TOK))
    b.load_state_dict(state)
    for x in rest:
        y = next(b)
        assert x.keys == y.keys and torch.equal(x.patches, y.patches) and torch.equal(x.input_ids, y.input_ids)
    b.close()


def test_a_wait_for_data_gives_up_when_interrupted_and_the_stream_does_not_move(tmp_path):
    make_shards(tmp_path, 2, 6)
    want = next(build_data_loader(config(tmp_path), TOK))
    loader = build_data_loader(config(tmp_path), TOK)
    stuck = threading.Event()
    read = loader.reader.read
    loader.reader.read = lambda s, i: stuck.wait() and read(s, i)  # storage that hangs until set
    loader.interrupt = lambda: not stuck.is_set()
    t0 = time.monotonic()
    with pytest.raises(DataWaitInterrupted):
        next(loader)
    assert time.monotonic() - t0 < 5
    stuck.set()
    got = next(loader)
    assert got.keys == want.keys and torch.equal(got.patches, want.patches)
    loader.close()


def test_skip_warnings_are_rate_limited_and_counts_exact(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(reader_mod, "SKIP_SUMMARY_EVERY", 40)
    samples = [(f"bad{i:04d}", {"jpg": b"not an image", "txt": b"x"}) for i in range(130)]
    samples += [(f"good{i}", {"jpg": tiny_jpeg(i), "txt": b"a cross ."}) for i in range(3)]
    write_shard(tmp_path / "s-000000.tar", samples)
    with caplog.at_level(logging.WARNING, logger="genlip_fast.data"):
        loader = build_data_loader(config(tmp_path, shuffle_shards=1), TOK, epochs=1)
        assert sum(p.num_samples for p in loader) == 3
    assert loader.stats["skipped"] == {"not an image": 130}
    per_sample = [r for r in caplog.records if r.getMessage().startswith("skipping bad")]
    summaries = [r for r in caplog.records if "samples skipped so far" in r.getMessage()]
    assert len(per_sample) == reader_mod.SKIP_DETAILS and len(summaries) == 3  # at 40, 80 and 120


# -- positions through the loader -----------------------------------------------------------------------------------
def test_loader_remap_continues_with_every_sample_once(tmp_path):
    """Two streams stop mid-epoch; three streams continue their saved positions (packer-held samples included):
    every sample of the two epochs arrives exactly twice."""
    make_shards(tmp_path, 6, 9)
    everything = Counter({f"s{s:03d}k{i:04d}": 2 for s in range(6) for i in range(9)})
    seen = Counter()
    states = {}
    for s in range(2):
        a = build_data_loader(config(tmp_path, shuffle_shards=2), TOK, rank=s, world_size=2, epochs=2)
        for _ in range(2):
            seen.update(keys_of(next(a)))
        states[s] = a.state_dict()
        a.close()
    held = sum(len(b) for st in states.values() for b in st["closed"] + st["open"])
    assert held > 0
    carried = 0
    for s in range(3):
        b = build_data_loader(config(tmp_path, shuffle_shards=3), TOK, rank=s, world_size=3, epochs=2)
        info = b.load_remapped(states)
        carried += info["held"]
        seen.update(k for p in b for k in keys_of(p))
    assert carried == held and seen == everything
    with pytest.raises(ValueError, match="version 1.*checkpoint.init_from"):  # a position from the old sampler
        b.load_state_dict({"version": 1, "digest": b.digest, "rank": 0, "world_size": 3, "epoch": 0, "pos": 5})


def test_loader_binds_its_thread_to_the_device_and_pins_packs(tmp_path, monkeypatch):
    """What the CPU can check of the GPU path: the loader thread calls ``torch.cuda.set_device`` with the rank's
    device before it makes a pack, and every pack is handed out through ``pin_memory``."""
    make_shards(tmp_path, 2, 4)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", threading.current_thread().name,
                                                                          torch.device(d))))
    monkeypatch.setattr(PackedBatch, "pin_memory", lambda self: calls.append(("pin", self.num_samples)) or self)
    loader = build_data_loader(config(tmp_path), TOK, epochs=1, device="cuda:1")
    packs = list(loader)
    assert calls[0] == ("set_device", "genlip-data-stream0", torch.device("cuda", 1))
    assert [c[1] for c in calls[1:]] == [p.num_samples for p in packs] and all(c[0] == "pin" for c in calls[1:])

