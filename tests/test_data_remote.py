"""Remote shards: tars with their index sidecars and manifest on a real S3-compatible server (moto's, on loopback),
read by ranged GETs; retries against a real HTTP server that fails transiently; one clear error for missing
objects, credentials and backends."""

import http.server
import io
import logging
import threading

import numpy as np
import pytest
from PIL import Image

s3fs = pytest.importorskip("s3fs")

from genlip_fast.data import storage  # noqa: E402
from genlip_fast.data.config import DataConfig  # noqa: E402
from genlip_fast.data.manifest import build_manifest, describe_dataset, read_manifest, update_manifest  # noqa: E402
from genlip_fast.data.manifest import shard_entry  # noqa: E402
from genlip_fast.data.pipeline import build_data_loader  # noqa: E402
from genlip_fast.data.reader import Record, ShardReader, Skipped  # noqa: E402
from genlip_fast.data.specs import NoShardsError, expand_spec  # noqa: E402
from genlip_fast.data.storage import StorageSetupError  # noqa: E402
from genlip_fast.data.tokenizer import load_tokenizer  # noqa: E402
from genlip_fast.data.webdataset import load_index, write_shard  # noqa: E402

TOK = load_tokenizer("demo")
BUCKET = "genlip-test"


def noise_jpeg(seed: int, side: int = 96) -> bytes:
    """~20 KB of incompressible JPEG, so a shard is much larger than the samples a test reads from it."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def local_shards(root, n=3, per=12, index=True) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n):
        p = root / f"s-{s:06d}.tar"
        write_shard(p, [(f"s{s}k{i:02d}", {"jpg": noise_jpeg(100 * s + i), "txt": b"a red circle ."})
                        for i in range(per)], index=index)
        paths.append(str(p))
    if index:
        update_manifest(root, {p.rsplit("/", 1)[-1]: shard_entry(p) for p in paths})
    return paths


def upload(local_dir, prefix: str) -> str:
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    fs.put(str(local_dir) + "/", f"{BUCKET}/{prefix}/", recursive=True)
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def remote(s3_server, tmp_path_factory):
    """Three indexed shards (12 samples of ~20 KB each) and their manifest, locally and on the S3 server."""
    local = tmp_path_factory.mktemp("remote") / "shards"
    local_shards(local)
    return local, upload(local, "indexed")


def tar_gets(requests, name):
    return [r for r in requests if r["method"] == "GET" and r["path"].endswith(name)]


def test_a_remote_sample_is_one_ranged_read_of_its_members(s3_server, remote):
    _, url = remote
    _, requests = s3_server
    shard = f"{url}/s-000000.tar"
    reader = ShardReader([shard])
    assert reader.count(0) == 12  # the index: from the .idx sidecar beside the shard
    index = load_index(shard)
    del requests[:]
    got = [reader.read(0, i) for i in (3, 7)]
    assert all(isinstance(r, Record) for r in got) and [r.key for r in got] == ["s0k03", "s0k07"]
    assert got[0].image == noise_jpeg(3)
    gets = tar_gets(requests, "/s-000000.tar")
    spans = [max(o + n for o, n in index[i][1].values()) - min(o for o, _ in index[i][1].values()) for i in (3, 7)]
    assert len(gets) == 2 and all(g["range"] for g in gets)  # one ranged GET per sample ...
    assert sorted(g["bytes"] for g in gets) == sorted(spans)  # ... of exactly its members' span
    assert sum(spans) < storage.size(shard) / 4  # not the shard


def test_remote_specs_expand_as_local_ones(s3_server, remote):
    """Brace ranges, folders (searched recursively; sidecars and the manifest left out), ** and comma lists name the
    same shards on S3 as on disk, as s3:// URLs; a range naming missing objects says which (issue 25 item 1)."""
    _, url = remote
    want = [f"{url}/s-{i:06d}.tar" for i in range(3)]
    for spec in (f"{url}/s-{{000000..000002}}.tar", url, f"{url}/", f"{url}/**/*.tar",
                 f"{url}/s-00000{{0,1}}.tar,{url}/*.tar"):
        assert expand_spec(spec) == want, spec
    with pytest.raises(NoShardsError, match=f"1 of the 4 paths its braces name do not exist .'{url}/s-000003.tar'"):
        expand_spec(f"{url}/s-{{000000..000003}}.tar")


def test_remote_stream_matches_local_and_resumes_exactly(s3_server, remote, monkeypatch):
    """The same packs from S3 (read ahead on 16 threads) as from the local copy; the dataset size comes from the
    remote manifest; a saved position continues exactly. The endpoint and credentials come from
    data.storage_options here (not the environment)."""
    local, url = remote
    endpoint, _ = s3_server
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    s3fs.S3FileSystem.clear_instance_cache()
    opts = {"s3": {"endpoint_url": endpoint, "key": "test-key", "secret": "test-secret"}}
    kw = dict(backend="host", image_size=32, batch_size=8, num_threads=1, pack_tokens=192, shuffle_shards=2)
    try:
        cfg = DataConfig(train_shards=f"{url}/*.tar", storage_options=opts, **kw)
        loader = build_data_loader(cfg, TOK, epochs=1)
        assert describe_dataset(loader.reader.shards) == "data: 3 shards, 36 samples per epoch (from " \
                                                         "genlip-manifest.json)"
        remote_keys = [[k.split(":")[-1] for k in p.keys] for p in loader]
        local_cfg = DataConfig(train_shards=str(local / "*.tar"), **kw)
        assert remote_keys == [[k.split(":")[-1] for k in p.keys] for p in build_data_loader(local_cfg, TOK, epochs=1)]
        assert sum(map(len, remote_keys)) == 36
        first = build_data_loader(cfg, TOK, epochs=1)
        head = [next(first).keys for _ in range(2)]
        state = first.state_dict()
        first.close()
        rest = build_data_loader(cfg, TOK, epochs=1)
        rest.load_state_dict(state)
        assert [[k.split(":")[-1] for k in ks] for ks in head + [p.keys for p in rest]] == remote_keys
    finally:
        storage.configure({})
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_remote_mixture_is_read_ahead_across_its_sources_and_resumes_exactly(s3_server, remote, monkeypatch):
    """Two remote sources mixed by weight: the read-ahead's scout follows the mixture's draws (it never has to
    start over), the packs are the local copy's, and a saved position continues exactly."""
    from genlip_fast.data import reader as reader_mod
    from genlip_fast.data.config import SourceConfig

    local, url = remote
    syncs = []
    real_sync = reader_mod.ReadAhead._sync
    monkeypatch.setattr(reader_mod.ReadAhead, "_sync", lambda self: syncs.append(1) or real_sync(self))

    def config(root):
        return DataConfig(sources=[SourceConfig(path=f"{root}/s-000000.tar", weight=2, name="a"),
                                   SourceConfig(path=f"{root}/s-00000{{1,2}}.tar", name="b")],
                          backend="host", image_size=32, batch_size=8, num_threads=1, pack_tokens=192,
                          shuffle_shards=2, read_ahead=8)

    def keys(packs):
        return [[k.split(":")[-1] for k in p.keys] for p in packs]

    want = keys(build_data_loader(config(local), TOK, epochs=2))
    assert syncs == []  # local shards: no read-ahead
    loader = build_data_loader(config(url), TOK, epochs=2)
    assert keys(loader) == want and loader.reader._pool is not None and syncs == [1]
    first = build_data_loader(config(url), TOK, epochs=2)
    head = keys(next(first) for _ in range(3))
    state = first.state_dict()
    first.close()
    rest = build_data_loader(config(url), TOK, epochs=2)
    rest.load_state_dict(state)
    assert head + keys(rest) == want and syncs == [1, 1, 1]  # each stream's scout kept up with its draws


def test_the_manifest_command_indexes_and_counts_remote_shards(s3_server, tmp_path, capsys):
    """Shards made elsewhere (no sidecar, no manifest) on S3: `python -m genlip_fast.data.manifest --index URL`
    writes the .idx sidecars and the manifest beside them."""
    from genlip_fast.data.manifest import main

    url = upload(tmp_path, "bare") if local_shards(tmp_path, n=2, per=5, index=False) else None
    assert read_manifest(url) == {}
    main(["--index", url])
    assert "2 shards, 10 samples; 2 .idx sidecars written" in capsys.readouterr().out
    assert {k: v["samples"] for k, v in read_manifest(url).items()} == {"s-000000.tar": 5, "s-000001.tar": 5}
    assert storage.exists(f"{url}/s-000000.tar.idx") and build_manifest(url, index=True)["indexed"] == []


# -- transient errors: a real HTTP server that answers 503 before it serves ----------------------------------------
class FlakyServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` with HTTP range support; the first ``fail`` requests for each path get 503."""

    def __init__(self, files: dict[str, bytes], fail: int):
        self.files, self.fail, self.seen = files, fail, {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(head=True)

            def do_GET(self):
                self.answer()

            def answer(self, head=False):
                srv = self.server
                n = srv.seen[self.path] = srv.seen.get(self.path, 0) + 1
                body = srv.files.get(self.path)
                code = 503 if n <= srv.fail else (404 if body is None else 200)
                if code == 200 and self.headers.get("Range"):
                    a, b = self.headers["Range"].split("=")[1].split("-")
                    a, b = int(a), int(b) if b else len(body) - 1
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{b}/{len(body)}")
                    body = body[a:b + 1]
                else:
                    self.send_response(code)
                    body = body if code == 200 else b""
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_transient_errors_are_retried_with_back_off_and_then_named(tmp_path, monkeypatch, caplog):
    pytest.importorskip("aiohttp")
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    path = local_shards(tmp_path, n=1, per=4)[0]
    files = {"/s.tar": open(path, "rb").read(), "/s.tar.idx": open(path + ".idx", "rb").read()}
    flaky = FlakyServer(files, fail=2)
    with caplog.at_level(logging.WARNING, logger="genlip_fast.data.storage"):
        reader = ShardReader([f"{flaky.url}/s.tar"])
        assert reader.count(0) == 4
        got = reader.read(0, 2)
    assert isinstance(got, Record) and got.image == noise_jpeg(2)
    assert "503" in caplog.text and "retrying in" in caplog.text and "(attempt 3 of 5)" in caplog.text
    assert flaky.seen["/s.tar"] >= 3  # failed twice, then served the range
    down = FlakyServer(files, fail=10**6)
    reader = ShardReader([f"{down.url}/s.tar"])
    assert reader.count(0) == 0  # nothing readable: the shard is counted bad, with the reason
    assert f"{down.url}/s.tar" in reader._bad[0] and "still failing after 5 attempts" in reader._bad[0]
    reader = ShardReader([f"{flaky.url}/gone.tar"])
    assert reader.count(0) == 0 and f"no such object: '{flaky.url}/gone.tar'" in reader._bad[0]
    flaky.shutdown()
    down.shutdown()


def test_missing_objects_credentials_and_backends_are_one_clear_error(s3_server, remote, monkeypatch, tmp_path,
                                                                      capsys):
    _, url = remote
    with pytest.raises(FileNotFoundError, match=f"no shard at '{url}/nope.tar'"):
        expand_spec(f"{url}/nope.tar")
    with pytest.raises(FileNotFoundError, match="no shard at 's3://no-such-bucket/x.tar'"):
        expand_spec("s3://no-such-bucket/x.tar")
    try:
        import gcsfs  # noqa: F401
    except ImportError:  # a protocol without its backend package: the package is named
        with pytest.raises(StorageSetupError, match="gs:// URLs needs the gcsfs package: pip install gcsfs"):
            expand_spec("gs://bucket/x.tar")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(StorageSetupError, match="no credentials .* set AWS_ACCESS_KEY_ID and "
                                                   "AWS_SECRET_ACCESS_KEY"):
            expand_spec(f"{url}/s-000000.tar")
        from genlip_fast.train.__main__ import main

        code = main([f"--data.train_shards={url}/*.tar", "--data.val_shards=", f"--train.out_dir={tmp_path}/run",
                     "--train.device=cpu", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("genlip-train: config error: data.train_shards")
        assert "no credentials" in err[0]
        assert not (tmp_path / "run").exists()
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
