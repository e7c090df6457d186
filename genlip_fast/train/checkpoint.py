"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, atomic, resumable exactly.

Layout of one checkpoint, ``<dir>/step_00001200/``::

    .metadata, __*_*.distcp    DCP: {"model": ..., "optim": ...} (each rank writes its shards)
    rank_00000.pt ...          per rank: RNG states and the data-loader state of each data stream it reads
    meta.json                  step, packs per step, data streams, world size, model and job config (written last)

Atomicity: everything is written into ``step_00001200.tmp``; after every rank has finished, rank 0 writes
``meta.json`` and renames the folder (one rename on one file system is atomic). A crash during a save leaves a
``.tmp`` folder that is never taken for a checkpoint and is removed by the next save; the last complete checkpoint
is untouched.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .distributed import barrier, broadcast_object

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``root``, oldest first (a folder counts only with its final name and meta.json)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, a checkpoints folder (-> its latest), or a run's out_dir (-> out_dir/checkpoints)."""
    p = Path(path)
    if (p / META).is_file():
        return p
    for root in (p, p / "checkpoints"):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no complete checkpoint at {p} (looked for {META} in it, its step_* and "
                            f"checkpoints/step_* folders)")


def read_meta(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / META).read_text())


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Checkpointer:
    """Saves and loads training state for every rank; every rank calls every method together."""

    root: Path
    rank: int
    world_size: int
    keep: int = 3

    def __post_init__(self):
        self.root = Path(self.root)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *, data_states: dict[int, dict],
             meta: dict, device: torch.device) -> Path:
        """Write checkpoint ``step`` atomically; returns its folder. ``data_states`` maps stream id -> loader state
        for the streams this rank reads; ``meta`` is stored in meta.json (rank 0's copy)."""
        final = self.root / step_dir_name(step)
        tmp = self.root / (final.name + ".tmp")
        exists = broadcast_object(final.is_dir() and (final / META).is_file() if self.rank == 0 else None)
        if exists:
            return final
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save({"rank": self.rank, "world_size": self.world_size, "rng": rng_state(device),
                    "data": data_states}, tmp / f"rank_{self.rank:05d}.pt")
        barrier()
        if self.rank == 0:
            with open(tmp / META, "w") as f:
                json.dump({**meta, "step": step, "world_size": self.world_size}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in list_checkpoints(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *,
             device: torch.device) -> tuple[dict, dict[int, dict], dict | None]:
        """Restore model and optimizer in place. Returns (meta, {stream: loader state} of every rank, this rank's
        RNG state or None when the world size changed)."""
        meta = read_meta(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        data: dict[int, dict] = {}
        for f in sorted(Path(path).glob("rank_*.pt")):
            data.update({int(k): v for k, v in torch.load(f, weights_only=False)["data"].items()})
        rng = None
        mine = Path(path) / f"rank_{self.rank:05d}.pt"
        if meta.get("world_size") == self.world_size and mine.is_file():
            rng = torch.load(mine, weights_only=False)["rng"]
        return meta, data, rng


def load_model_weights(path: str | os.PathLike, model: nn.Module) -> Path:
    """Load only the model weights of a checkpoint (stage 2 from stage 1); works sharded or not."""
    ckpt = resolve_checkpoint(path)
    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=str(ckpt))
    set_model_state_dict(model, sd)
    return ckpt


__all__ = ["Checkpointer", "latest_checkpoint", "list_checkpoints", "load_model_weights", "read_meta",
           "resolve_checkpoint", "rng_state", "set_rng_state", "step_dir_name"]
