"""Test-wide setup.

Triton kernels run in the CPU interpreter here, and the interpreter must be chosen before any kernel is decorated,
so the variable is set before genlip_fast is imported. Nothing touches CUDA at import time; GPU tests carry the
``gpu`` marker and are skipped without one. Tests marked ``slow`` (extras that would push CI past its time budget)
run only with ``--runslow`` or ``GENLIP_RUN_SLOW=1``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (outside CI's budget)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("GENLIP_RUN_SLOW") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or GENLIP_RUN_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        elif "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """The generated shapes dataset used by the trainer tests (written once per test session)."""
    from tiny_run import make_shapes

    return make_shapes(tmp_path_factory.mktemp("shapes"))


def error_bound_ok(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor, atol: float = 1e-5,
                   factor: float = 2.0) -> tuple[bool, str]:
    """flash-attn's rule: the fused result's error vs the fp32 oracle is at most ``factor`` x PyTorch's own
    low-precision error on the same inputs, plus ``atol``."""
    err = (out.float() - ref_fp32.float()).abs().max().item()
    base = (ref_lowp.float() - ref_fp32.float()).abs().max().item()
    return err <= factor * base + atol, f"err {err:.3e} vs bound {factor} * {base:.3e} + {atol:.1e}"


class _RequestLog:
    """WSGI middleware: records each request a server answers (method, path, Range header, body bytes sent)."""

    def __init__(self, app):
        self.app, self.requests = app, []

    def __call__(self, environ, start_response):
        entry = {"method": environ["REQUEST_METHOD"], "path": environ.get("PATH_INFO", ""),
                 "range": environ.get("HTTP_RANGE"), "bytes": 0}
        self.requests.append(entry)
        for chunk in self.app(environ, start_response):
            entry["bytes"] += len(chunk)
            yield chunk


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on loopback, shared by every remote test, and the
    environment pointing S3 clients at it with fake credentials (``AWS_ENDPOINT_URL`` and friends, as a user of
    MinIO or Ceph would set them). Yields ``(endpoint URL, request log)``: every request the server answered, as
    ``{"method", "path", "range", "bytes"}`` (response body bytes)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import logging
    import threading

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    app = _RequestLog(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="s3-server")
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY":
                     "test-secret", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            mp.setenv(k, v)
        yield endpoint, app.requests
    server.shutdown()
    thread.join()
