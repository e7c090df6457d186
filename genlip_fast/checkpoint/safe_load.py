"""Reading checkpoint files that may come from elsewhere, and per-rank state in a form that reads back safely.

A full ``torch.load`` (``weights_only`` off) and plain pickle run whatever code a file names, so a checkpoint from
another run or another person (``checkpoint.init_from``, a shared run folder) could run code when loaded. Here:

- per-rank state (RNG states, data-loader positions) is tensors and plain data (:func:`to_plain`, :func:`rng_state`)
  and :func:`load_rank_file` reads it with ``weights_only=True``;
- DCP unpickles its ``.metadata`` with plain pickle, so :func:`check_dcp_metadata` first unpickles it with an
  allowlist of the records DCP writes, and DCP's non-tensor entries (optimizer hyper-parameters) are unpickled
  weights-only first (:func:`load_dcp`).
Anything else is refused with a :class:`CheckpointError` naming the file and what it asked for.
"""

from __future__ import annotations

import io
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint import metadata as dcp_metadata

DCP_METADATA = ".metadata"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, trusted or used; the message names the path and the reason."""


def rng_state(device: torch.device) -> dict:
    """RNG states of torch (and CUDA), Python and NumPy as tensors and plain data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def to_plain(obj, where: str = "state"):
    """``obj`` as tensors, dicts, lists, tuples, str, int, float, bool and None (what ``weights_only`` loads).
    NumPy scalars become Python numbers and arrays a tagged uint8 tensor (:func:`from_plain` restores them);
    anything else is a TypeError naming where it sits."""
    if obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"{where} is a NumPy array of Python objects, which a checkpoint cannot hold")
        raw = torch.from_numpy(np.frombuffer(np.ascontiguousarray(obj).tobytes(), dtype=np.uint8).copy())
        return {"__ndarray__": raw, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"{where} has keys other than str and int")
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where} is a {type(obj).__name__}: a checkpoint holds only tensors and plain data")


def from_plain(obj):
    """Inverse of :func:`to_plain`."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.frombuffer(obj["__ndarray__"].numpy().tobytes(), dtype=np.dtype(obj["dtype"])).reshape(
                obj["shape"]).copy()
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_plain(v) for v in obj)
    return obj


def _refused(where: str | Path, message: str) -> CheckpointError:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    what = m.group(1) if m else (message.strip().splitlines() or ["Python object"])[0]
    return CheckpointError(f"refusing to load {where}: it holds a pickled {what}, not plain data (unpickling it could "
                           f"run code from whoever wrote the file); a genlip_fast checkpoint holds only tensors and "
                           f"plain data — was it written by another program, or altered?")


def load_rank_file(path: Path) -> dict:
    """A rank_*.pt file, loaded weights-only (tensors and plain data; anything pickled is refused)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, str(e)) from None


_DCP_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP's ``.metadata`` holds: its record classes, torch sizes, dtypes and layouts, paths."""

    def find_class(self, module: str, name: str):
        ok = ((module, name) in _DCP_GLOBALS
              or module == dcp_metadata.__name__ and getattr(getattr(dcp_metadata, name, None), "__module__", None)
              == module
              or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def check_dcp_metadata(path: Path) -> None:
    """Refuse a ``.metadata`` that would unpickle anything but DCP's records (DCP itself uses plain pickle)."""
    f = Path(path) / DCP_METADATA
    try:
        _MetadataUnpickler(io.BytesIO(f.read_bytes())).load()
    except pickle.UnpicklingError as e:
        raise _refused(f, str(e)) from None
    except (OSError, EOFError, ValueError, AttributeError, ImportError, IndexError, TypeError) as e:
        raise CheckpointError(f"{f} is unreadable ({type(e).__name__}: {e})") from None


class _WeightsOnlyPlanner(dcp.DefaultLoadPlanner):
    """DCP's planner loads non-tensor entries with a full ``torch.load`` (``weights_only`` off): check each one
    weights-only first (what passes uses only plain types, so the second unpickling is safe too)."""

    source: Path | None = None

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refused(f"{self.source} (entry {read_item.dest_index.fqn})", str(e)) from None
        value.seek(0)
        super().load_bytes(read_item, value)


def nested_exceptions(exc: BaseException):
    """``exc`` and every exception inside it (causes, contexts, DCP's per-rank failures)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            todo += [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]


def describe_exception(e: BaseException) -> str:
    """``Type: message`` of ``e``; for DCP's CheckpointException, whose text is every failing rank's traceback, that
    of a failure inside it."""
    if isinstance(e, CheckpointException):
        e = next((x for x in nested_exceptions(e) if not isinstance(x, CheckpointException)), e)
        if isinstance(e, CheckpointException):
            return f"CheckpointException on ranks {sorted(e.failures)}"
    return f"{type(e).__name__}: {e}"


def load_dcp(state: dict, path: Path, **kw) -> None:
    """``dcp.load`` of ``path`` into ``state`` in place, refusing pickled code (every rank calls it together). A
    failure is a :class:`CheckpointError`: DCP's own CheckpointException is a BaseException, which would pass every
    handler of an ordinary error."""
    check_dcp_metadata(path)
    planner = _WeightsOnlyPlanner()
    planner.source = path
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), planner=planner, **kw)
    except CheckpointException as e:
        refused = next((x for x in nested_exceptions(e) if isinstance(x, CheckpointError)), None)
        if refused is not None:
            raise CheckpointError(str(refused)) from None
        raise CheckpointError(f"reading {path} failed: {describe_exception(e)}") from e


__all__ = ["CheckpointError", "DCP_METADATA", "check_dcp_metadata", "describe_exception", "from_plain", "load_dcp",
           "load_rank_file", "nested_exceptions", "rng_state", "set_rng_state", "to_plain"]
