"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, atomic, checked, resumable exactly; every rank
takes part. The format on disk (step folders, meta.json, rank files, the manifest) and reading it in one process are
``genlip_fast/checkpoint/format.py``.

Saving: everything is written into ``step_00001200.tmp`` (a stale one, left by a killed save, is removed first);
after every rank has written its files, rank 0 writes meta.json, the ranks checksum the files between them, rank 0
writes the manifest and renames the folder (one rename on one file system is atomic). A folder that already has the
final name (an incomplete copy, say) is moved aside, never deleted. A full disk or quota stops the run with
:class:`CheckpointSpaceError` (the sizes needed, the partial folder removed); the last complete checkpoint is
untouched either way.

Resuming: :meth:`Checkpointer.select_resume` checks the newest checkpoint against its manifest (the ranks share the
reading). One that fails is reported by path and reason, renamed to ``step_….damaged`` and the one before it is
tried, loudly; with ``checkpoint.fallback = false`` the run stops instead. Files from elsewhere are not trusted:
rank files load weights-only, DCP's metadata pickle is checked against the classes DCP writes before DCP unpickles
it, and DCP's non-tensor entries load weights-only; anything else is refused with :class:`CheckpointError`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ..checkpoint.format import (
    META,
    RANK_FILE_FORMAT,
    checkpoint_entries,
    list_checkpoints,
    move_aside,
    rank_file,
    read_meta,
    require_passing,
    resolve_checkpoint,
    step_dir_name,
    step_folders,
    verify_checkpoint,
)
from ..checkpoint.manifest import MANIFEST, check_files, describe, write_manifest
from ..checkpoint.safe_load import (
    CheckpointError,
    describe_exception,
    from_plain,
    load_dcp,
    load_rank_file,
    nested_exceptions,
    rng_state,
    to_plain,
)
from .distributed import all_gather_objects, broadcast_object

log = logging.getLogger(__name__)


class CheckpointSpaceError(CheckpointError):
    """No space (or quota) left where a checkpoint is written."""


def format_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


DCP_ENTRY_BYTES = 4096
"""Bytes a checkpoint holds per state tensor and rank beside the tensor's data (its record in the rank's .distcp
file and its .metadata entry). Measured ≈ 2 kB with torch 2.13: the tiny preset's 11.75 MB of tensors (296 of them)
made checkpoints of 12.35 MB on 1 rank and 12.77 MB on 2 (CPU dev machine, 2026-12-07)."""
RANK_FILE_BYTES = 256 * 1024
"""A rank's rank_*.pt (random states, data positions: 16 kB in the tiny run) and its share of meta.json and the
manifest, with room to spare."""


def estimate_checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                              world_size: int = 1) -> int:
    """Bytes of one checkpoint written by ``world_size`` ranks, an upper bound: model parameters and buffers plus the
    optimizer state (global sizes; sharded tensors count whole), and per tensor and rank ``DCP_ENTRY_BYTES`` and per
    rank ``RANK_FILE_BYTES`` (``tests/test_faults.py`` checks it against real checkpoints). Before the first step,
    AdamW's state is taken as two copies of the parameters and a step count per parameter."""
    params = list(model.parameters())
    data = sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size()
                                                                    for b in model.buffers())
    state = [t for s in (optimizer.state.values() if optimizer is not None else ()) for t in s.values()
             if isinstance(t, torch.Tensor)]
    if state:
        data += sum(t.numel() * t.element_size() for t in state)
    else:
        data += 2 * sum(p.numel() * p.element_size() for p in params)
    tensors = len(params) + len(list(model.buffers())) + (len(state) if state else 3 * len(params))
    return data + tensors * world_size * DCP_ENTRY_BYTES + world_size * RANK_FILE_BYTES


# ---- checking ----

def verify_together(path: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """:func:`~genlip_fast.checkpoint.format.verify_checkpoint` by every rank together: rank 0 reads meta.json and
    the manifest, each rank checksums ``1/world_size`` of the files; all get the same list."""
    if world_size == 1:
        return verify_checkpoint(path)
    entries, problems = broadcast_object(checkpoint_entries(path) if rank == 0 else None)
    if problems:
        return problems
    mine = {n: entries[n] for n in sorted(entries)[rank::world_size]}
    return [p for found in all_gather_objects(check_files(path, mine)) for p in found]


def _out_of_space(exc: BaseException, folder: Path, need: int) -> bool:
    """An errno of ENOSPC / EDQUOT anywhere in ``exc``; or, when no errno says otherwise (DCP's zip writer loses
    it: "unexpected pos"), less room on ``folder``'s file system than one checkpoint, counting what the failed save
    already wrote."""
    errnos = {e.errno for e in nested_exceptions(exc) if isinstance(e, OSError) and e.errno is not None}
    if errnos & {errno.ENOSPC, errno.EDQUOT}:
        return True
    if errnos:
        return False
    try:
        free = shutil.disk_usage(nearest_existing(folder)).free
    except OSError:
        return False
    return free + _tree_bytes(folder) < 1.1 * need + (16 << 20)


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (where a folder that does not exist yet would be made)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _tree_bytes(folder: Path) -> int:
    try:
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    except OSError:
        return 0


def space_message(root: Path, need: int, keep: int) -> str:
    free = shutil.disk_usage(nearest_existing(root)).free
    return (f"no space left on {root}: this checkpoint needs ≈ {format_bytes(need)}, checkpoint.keep={keep} needs "
            f"≈ {format_bytes((keep + 1) * need)} ({keep} kept + 1 being written); {format_bytes(free)} free now. "
            f"Free space, lower checkpoint.keep, or set checkpoint.dir to a larger disk")


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
    """Saves, checks and loads training state for every rank; every rank calls every method together."""

    root: Path
    rank: int
    world_size: int
    keep: int = 3

    def __post_init__(self):
        self.root = Path(self.root)

    def _together(self, fn, *, tmp: Path, need: int, everyone: bool = True):
        """Run ``fn`` on every rank (or on rank 0); if it fails anywhere, every rank raises: out of space as
        :class:`CheckpointSpaceError` with the partial folder removed, otherwise the failing rank's own error."""
        out = err = None
        if everyone or self.rank == 0:
            try:
                out = fn()
            except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
                err = e
        reports = all_gather_objects(None if err is None else (describe_exception(err).strip()[:2000],
                                                                _out_of_space(err, tmp, need)))
        failed = {r: rep for r, rep in enumerate(reports) if rep is not None}
        if not failed:
            return out
        if any(space for _, space in failed.values()):
            msg = None
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                msg = space_message(self.root, need, self.keep) + f"; the partial save {tmp} was removed"
            raise CheckpointSpaceError(broadcast_object(msg)) from err
        if err is not None and not isinstance(err, CheckpointException):
            raise err  # this rank's own error, as it was raised
        # DCP's CheckpointException is a BaseException: raised as it is, it would pass every handler of an ordinary
        # error and end the run in a traceback
        r, (summary, _) = next(iter(failed.items()))
        raise CheckpointError(f"saving {tmp} failed on rank {r}: {summary}") from err

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *, data_states: dict[int, dict],
             meta: dict, device: torch.device) -> Path:
        """Write checkpoint ``step`` atomically; returns its folder. ``data_states`` maps stream id -> loader state
        for the streams this rank reads; ``meta`` is stored in meta.json (rank 0's copy)."""
        final = self.root / step_dir_name(step)
        tmp = self.root / (final.name + ".tmp")
        need = estimate_checkpoint_bytes(model, optimizer, world_size=self.world_size)

        def prepare():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
                if stale.exists():
                    move_aside(stale, "stale")
            tmp.mkdir()

        def write():
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
            own = {"format": RANK_FILE_FORMAT, "rank": self.rank, "world_size": self.world_size,
                   "rng": rng_state(device), "data": to_plain(data_states, "data-loader state")}
            with open(tmp / rank_file(self.rank), "wb") as f:
                torch.save(own, f)
                f.flush()
                os.fsync(f.fileno())

        def write_meta():
            with open(tmp / META, "w") as f:
                json.dump({**meta, "step": step, "world_size": self.world_size}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())

        def commit(entries: dict):
            if final.exists():  # a damaged or incomplete copy under the final name: keep it, out of the way
                why = "superseded" if (final / MANIFEST).is_file() else "incomplete"
                log.warning("moved %s aside to %s before saving step %d", final, move_aside(final, why), step)
            write_manifest(tmp, entries)
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in list_checkpoints(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)

        self._together(prepare, tmp=tmp, need=need, everyone=False)
        self._together(write, tmp=tmp, need=need)
        self._together(write_meta, tmp=tmp, need=need, everyone=False)
        # Each rank lists the folder (it surely sees its own files, whatever a network file system's listing cache
        # shows it of the others'); the union is split between the ranks for checksumming.
        seen = self._together(lambda: os.listdir(tmp), tmp=tmp, need=need)
        names = sorted({n for listed in all_gather_objects(seen) for n in listed})
        part = self._together(lambda: describe(tmp, names[self.rank::self.world_size]), tmp=tmp, need=need)
        entries = {k: v for got in all_gather_objects(part) for k, v in got.items()}
        self._together(lambda: commit(entries), tmp=tmp, need=need, everyone=False)
        return final

    def select_resume(self, *, fallback: bool = True) -> Path | None:
        """The newest checkpoint in ``root`` that passes :func:`verify_together`, or None when there is none.

        A failing one is logged with its path and reasons; with ``fallback`` it is moved aside to
        ``step_….damaged`` and the previous one is tried, otherwise CheckpointError. When checkpoints exist but none
        passes (or only damaged ones are left) it is a CheckpointError too: a fresh start would take the run back
        to step 0, which only ``checkpoint.resume = false`` should do."""
        candidates = broadcast_object(step_folders(self.root) if self.rank == 0 else None)
        skipped = []
        for path in reversed(candidates):
            problems = verify_together(path, self.rank, self.world_size)
            if not problems:
                if skipped and self.rank == 0:
                    log.warning("RESUMING FROM AN OLDER CHECKPOINT: %s (%d newer failed their check: %s)", path,
                                len(skipped), ", ".join(skipped))
                return path
            reasons = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            if not fallback:
                raise CheckpointError(
                    f"checkpoint {path} failed its check: {reasons}. checkpoint.fallback is false, so the run stops "
                    f"(nothing was moved); --checkpoint.fallback=true moves it aside and resumes from the newest "
                    f"checkpoint that passes")
            aside = None
            if self.rank == 0:
                try:
                    aside = str(move_aside(path, "damaged"))
                    log.warning("checkpoint %s failed its check: %s. Moved aside to %s; trying the one before it",
                                path, reasons, aside)
                except OSError as e:
                    aside = OSError(f"checkpoint {path} failed its check ({reasons}) and cannot be moved aside: {e}")
            aside = broadcast_object(aside)
            if isinstance(aside, OSError):
                raise CheckpointError(str(aside))
            skipped.append(aside)
        damaged = broadcast_object(sorted(str(p) for p in self.root.glob("step_*.damaged*")) if self.rank == 0
                                   else None)
        if damaged:
            raise CheckpointError(
                f"no checkpoint in {self.root} passed its check; the damaged ones are kept aside ({', '.join(damaged)})"
                f". Nothing to resume from: rerun with --checkpoint.resume=false to start again from step 0")
        return None

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *,
             device: torch.device) -> tuple[dict, dict[int, dict], dict | None]:
        """Restore model and optimizer in place. Returns (meta, {stream: loader state} of every rank, this rank's
        RNG state or None when the world size changed)."""
        path = Path(path)
        meta = read_meta(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        load_dcp(state, path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        data: dict[int, dict] = {}
        rng = None
        for r in range(int(meta["world_size"])):
            own = load_rank_file(path / rank_file(r))
            if own.get("format") != RANK_FILE_FORMAT:
                raise CheckpointError(f"{path / rank_file(r)} has format {own.get('format')!r}; this version "
                                      f"reads {RANK_FILE_FORMAT}")
            data.update({int(k): from_plain(v) for k, v in own["data"].items()})
            if r == self.rank and meta["world_size"] == self.world_size:
                rng = own["rng"]
        return meta, data, rng


def load_model_weights(path: str | os.PathLike, model: nn.Module) -> Path:
    """Load only the model weights of a checkpoint (stage 2 from stage 1); works sharded or not. The checkpoint
    must pass its check; nothing in its folder is changed."""
    ckpt = resolve_checkpoint(path)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    require_passing(ckpt, verify_together(ckpt, rank, world))
    sd = get_model_state_dict(model)
    load_dcp({"model": sd}, ckpt)
    set_model_state_dict(model, sd)
    return ckpt


__all__ = ["CheckpointSpaceError", "Checkpointer", "estimate_checkpoint_bytes", "format_bytes", "load_model_weights",
           "nearest_existing", "space_message", "verify_together"]
