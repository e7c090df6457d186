"""Where shard bytes come from: local files, or object stores and web servers through fsspec.

A shard, its ``.idx`` sidecar and its folder's ``genlip-manifest.json`` may be local paths or URLs of any fsspec
protocol (``s3://bucket/s1/000123.tar``, ``gs://...``, ``https://...``); the reader asks only for byte ranges,
so a remote sample costs one ranged GET of its members (never a download of the whole shard). ::

    open_source(path).read(offset, size)    # one sample's members: os.pread locally, a ranged GET remotely
    read_file(path) / size(path) / exists(path) / is_file(path) / write_file(path, data)

(Listing folders and patterns is :mod:`~genlip_fast.data.specs`'s, through the same retries.)

Every remote call is retried with exponential back-off (and jitter) on transient failures: connection errors,
timeouts, HTTP 408/425/429/5xx. What retrying cannot mend is one clear error naming the URL:
:class:`StorageSetupError` (no fsspec backend package for the protocol, or no credentials: the run cannot read any
remote shard), ``FileNotFoundError`` (no such object or bucket), ``PermissionError`` (access denied), or
``OSError`` (still failing after the last retry).

Endpoint and credentials: the environment variables the backends read themselves (S3: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for an S3-compatible server such as MinIO or
Ceph; GCS: ``GOOGLE_APPLICATION_CREDENTIALS``), fsspec's own configuration (``FSSPEC_S3_ENDPOINT_URL=...``,
``~/.config/fsspec/*.json``), or the job config's ``data.storage_options`` table keyed by protocol, which
:func:`configure` hands to fsspec as per-protocol defaults::

    [data.storage_options.s3]
    endpoint_url = "http://minio.internal:9000"
    anon = false
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRIES = 5
"""Attempts of a remote call before its error is raised (transient failures only)."""
BACKOFF_S = 0.5
"""First back-off; it doubles per attempt (with ±50% jitter), capped at ``MAX_BACKOFF_S``."""
MAX_BACKOFF_S = 16.0

BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp",
            "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub"}
"""The package fsspec needs for each common protocol (named in the error when it is missing)."""

CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or data.storage_options.s3.anon = "
          "true for a public bucket",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or data.storage_options.gs.token = "
          "'anon' for a public bucket",
}
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_jitter = random.Random()  # not the global generator: back-off must not touch any seeded state


class StorageSetupError(RuntimeError):
    """This machine cannot read a kind of shard at all (no fsspec backend for a URL's protocol, no credentials, no
    pyarrow for Parquet): every such shard would fail the same way, so it is fatal rather than one bad shard."""


def protocol(path: str | os.PathLike) -> str:
    """``"s3"`` for ``s3://b/k``; ``""`` for a local path (``file://`` URLs included)."""
    s = str(path)
    if "://" not in s:
        return ""
    p = s.split("://", 1)[0].lower()
    return "" if p in ("file", "local") else p


def is_remote(path: str | os.PathLike) -> bool:
    return protocol(path) != ""


def local_path(path: str | os.PathLike) -> str:
    s = str(path)
    return s.split("://", 1)[1] if s.startswith(("file://", "local://")) else s


def join(base: str, *names: str) -> str:
    """``base/name``: URLs join with ``/`` (``os.path.join`` would fold ``s3://``), local paths with the OS's
    rule (so an absolute ``name`` wins)."""
    if is_remote(base):
        out = base
        for n in names:
            out = n if is_remote(n) else out.rstrip("/") + "/" + n.lstrip("/")
        return out
    return os.path.join(base, *names)


def name(path: str) -> str:
    """The file name of ``path`` (``x.tar`` for ``s3://b/d/x.tar`` and for ``/d/x.tar``)."""
    return path.rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(path)


def parent(path: str) -> str:
    """The folder of ``path`` (``s3://b/d`` for ``s3://b/d/x.tar``)."""
    if is_remote(path):
        head, _, _ = path.rstrip("/").rpartition("/")
        return head if "://" in head else path
    return os.path.dirname(path) or "."


# -- fsspec ------------------------------------------------------------------------------------------------------
_conf_lock = threading.Lock()
_base_conf: dict | None = None


def configure(options: Mapping[str, Mapping] | None) -> None:
    """Make ``options`` (``{protocol: {fsspec option: value}}``, the job's ``data.storage_options``) the defaults
    of every fsspec filesystem this process opens, on top of fsspec's own configuration (environment variables
    ``FSSPEC_<PROTOCOL>_<OPTION>``, config files). Calling it again replaces the options of the previous call."""
    options = dict(options or {})
    for proto, opts in options.items():
        if not isinstance(opts, Mapping):
            raise ValueError(f"data.storage_options.{proto} must be a table of fsspec options for {proto}:// URLs, "
                             f"got {opts!r}")
    global _base_conf
    if not options and _base_conf is None:
        return  # nothing to set and nothing set before: fsspec stays untouched (and unimported)
    import fsspec.config

    with _conf_lock:
        if _base_conf is None:
            _base_conf = copy.deepcopy(fsspec.config.conf)
        conf = copy.deepcopy(_base_conf)
        for proto, opts in options.items():
            conf.setdefault(proto, {}).update(opts)
        # in place and never emptied on the way: a loader thread may be opening a filesystem meanwhile (the
        # held-out loader is built, with the same options, while the training stream reads)
        live = fsspec.config.conf
        for proto in [p for p in live if p not in conf]:
            del live[proto]
        live.update(conf)


def filesystem(url: str):
    """``(fsspec filesystem, path within it)`` for ``url``; :class:`StorageSetupError` naming the package to install
    when the protocol has no backend here."""
    try:
        import fsspec.core
    except ImportError:
        raise StorageSetupError(f"{url}: reading URLs needs fsspec: pip install 'genlip_fast[remote]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        pkg = BACKENDS.get(protocol(url))
        need = f"the {pkg} package: pip install {pkg}" if pkg else f"an fsspec backend for {protocol(url)}://"
        raise StorageSetupError(f"{url}: reading {protocol(url)}:// URLs needs {need} ({e})") from None
    except ValueError as e:
        raise StorageSetupError(f"{url}: {e}") from None


def _status(e: BaseException) -> int | None:
    """The HTTP status an error carries (aiohttp's ``status``, botocore's response metadata), if any."""
    st = getattr(e, "status", None)
    resp = getattr(e, "response", None)
    if not isinstance(st, int) and isinstance(resp, dict):
        st = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return st if isinstance(st, int) else None


def _classify(e: BaseException) -> str:
    """``"missing" | "denied" | "credentials" | "transient" | "other"`` for an error of a remote call."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "CredentialRetrievalError"}:
        return "credentials"
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, PermissionError):
        return "denied"
    status = _status(e)
    if status is not None:
        if status == 404:
            return "missing"
        if status in (401, 403):
            return "denied"
        return "transient" if status in _TRANSIENT_STATUS else "other"
    if isinstance(e, (OSError, TimeoutError, ConnectionError)) or names & {"ClientError", "TimeoutError",
                                                                            "ServerTimeoutError"}:
        return "transient"
    return "other"


def retrying(url: str, fn: Callable[[], T], what: str = "read") -> T:
    """``fn()`` with retries on transient errors; the errors it cannot mend re-raised as the module doc says."""
    for attempt in range(1, RETRIES + 1):
        try:
            return fn()
        except StorageSetupError:
            raise
        except Exception as e:  # noqa: BLE001 - sorted by _classify, re-raised below unless transient
            kind = _classify(e)
            if kind == "credentials":
                hint = CREDENTIAL_HINTS.get(protocol(url), "configure the backend's credentials")
                raise StorageSetupError(f"{url}: no credentials to {what} it ({type(e).__name__}: {e}); {hint}") \
                    from None
            if kind == "missing":
                raise FileNotFoundError(errno.ENOENT, "no such object", url) from None
            if kind == "denied":
                raise PermissionError(errno.EACCES, f"access denied ({e})", url) from None
            if kind == "other":
                raise
            if attempt == RETRIES:
                raise OSError(errno.EIO, f"{type(e).__name__}: {e} (still failing after {RETRIES} attempts)",
                              url) from None
            wait = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1)) * (0.5 + _jitter.random())
            log.warning("%s: %s failed (%s: %s); retrying in %.1f s (attempt %d of %d)", url, what,
                        type(e).__name__, e, wait, attempt + 1, RETRIES)
            time.sleep(wait)
    raise AssertionError("unreachable")


# -- the operations the data code needs ----------------------------------------------------------------------
def read_file(path: str) -> bytes:
    """The whole file (small ones: sidecars, manifests, listings, single images)."""
    if not is_remote(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    fs, p = filesystem(path)
    return retrying(path, lambda: fs.cat_file(p))


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(local_path(path))
    fs, p = filesystem(path)
    return int(retrying(path, lambda: fs.size(p), "stat"))


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(local_path(path))
    fs, p = filesystem(path)
    return bool(retrying(path, lambda: fs.exists(p), "stat"))


def is_file(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(local_path(path))
    fs, p = filesystem(path)
    return bool(retrying(path, lambda: fs.isfile(p), "stat"))


def write_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path``: locally atomically (a temp file renamed into place); remotely one PUT (an object
    appears whole or not at all)."""
    if not is_remote(path):
        path = local_path(path)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, p = filesystem(path)
    retrying(path, lambda: fs.pipe_file(p, data), "write")


def open_input(path: str, block_size: int = 1 << 16):
    """A seekable binary file object for readers that walk a file themselves (``tarfile`` scanning headers,
    pyarrow reading a Parquet footer and column chunks). Remotely each read past the cached block is a ranged GET
    of ``block_size`` bytes at least; the caller retries the whole walk (:func:`retrying`)."""
    if not is_remote(path):
        return open(local_path(path), "rb")  # noqa: SIM115 - the caller closes it
    fs, p = filesystem(path)
    return retrying(path, lambda: fs.open(p, "rb", block_size=block_size, cache_type="readahead"), "open")


class LocalSource:
    """Byte ranges of a local file: ``os.pread`` on one descriptor, safe from several threads at once."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(local_path(path), os.O_RDONLY)

    def read(self, offset: int, n: int) -> bytes:
        out = os.pread(self._fd, n, offset)
        if len(out) < n:
            raise OSError(errno.EIO, f"short read: {len(out)} of {n} bytes at offset {offset}", self.path)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RemoteSource:
    """Byte ranges of a remote object: one ranged GET per read (retried), safe from several threads at once."""

    def __init__(self, url: str):
        self.path = url
        self._fs, self._p = filesystem(url)

    def read(self, offset: int, n: int) -> bytes:
        out = retrying(self.path, lambda: self._fs.cat_file(self._p, start=offset, end=offset + n))
        if len(out) < n:
            raise OSError(errno.EIO, f"short read: {len(out)} of {n} bytes at offset {offset}", self.path)
        return out

    def close(self) -> None:
        pass


def open_source(path: str) -> LocalSource | RemoteSource:
    """Random access to ``path``'s bytes (``.read(offset, n)``, ``.close()``)."""
    return RemoteSource(path) if is_remote(path) else LocalSource(path)
