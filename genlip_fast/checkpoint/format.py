"""The trainer's checkpoint format on disk: step folders, meta.json, the manifest check, finding the checkpoint a
path means. Everything here runs in one process; what every rank does together (saving, the resume check split
between ranks, loading sharded weights) is ``genlip_fast/train/checkpoint.py``, which builds on this.

Layout of one checkpoint, ``<dir>/step_00001200/``::

    .metadata, __*_*.distcp    DCP: {"model": ..., "optim": ...} (each rank writes its shards)
    rank_00000.pt ...          per rank: RNG states and the data-loader state of each stream it reads (tensors and
                               plain data only: read with torch.load(weights_only=True))
    meta.json                  step, packs per step, data streams, world size, model and job config
    manifest.json              every other file with its size and xxh3_64 checksum (see manifest.py)

A folder counts as a checkpoint only under its final name (``step_`` and eight digits) and with its meta.json; a
save in progress is ``step_….tmp`` and one that failed its check is moved aside to ``step_….damaged``. A checkpoint
imported from the authors' layout has the same files with ``world_size`` 0 and no rank files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..model.config import ModelConfig
from .manifest import MANIFEST, check_files, read_manifest
from .safe_load import DCP_METADATA, CheckpointError

STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"
RANK_FILE_FORMAT = 2
"""Version of the rank_*.pt layout (2: plain data, weights-only loadable)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def step_folders(root: str | os.PathLike) -> list[Path]:
    """Every folder in ``root`` with a checkpoint's final name (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``root``, oldest first (a folder counts only with its final name and meta.json)."""
    return [p for p in step_folders(root) if (p / META).is_file()]


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


def model_config_dict(cfg: ModelConfig) -> dict:
    """``cfg`` as meta.json, an exported file's metadata and the authors'-layout export store it (plain JSON: the
    MRoPE sections a list)."""
    return dict(cfg.__dict__, mrope_section=list(cfg.mrope_section))


def model_config_from_dict(d: dict) -> ModelConfig:
    """The :class:`ModelConfig` a :func:`model_config_dict` holds."""
    return ModelConfig(**{**d, "mrope_section": tuple(d["mrope_section"])})


def move_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to ``<name>.<why>`` (``.<why>-2``, ... when taken); never deletes anything."""
    for i in range(1, 1000):
        dst = path.with_name(f"{path.name}.{why}" + (f"-{i}" if i > 1 else ""))
        if not dst.exists():
            os.replace(path, dst)
            return dst
    raise CheckpointError(f"cannot move {path} aside: {path.name}.{why} ... {path.name}.{why}-999 all exist")


# ---- checking ----

def checkpoint_entries(path: Path) -> tuple[dict[str, dict] | None, list[str]]:
    """``(manifest entries, problems)`` of checkpoint ``path`` before any checksum: meta.json readable, the manifest
    readable and listing every file the format requires (the DCP metadata, meta.json, one rank file per rank)."""
    problems = []
    try:
        meta = read_meta(path)
        listed = {DCP_METADATA, META} | {rank_file(r) for r in range(int(meta["world_size"]))}
    except FileNotFoundError:
        problems.append(f"no {META} (an incomplete save or copy)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{META} is unreadable ({type(e).__name__}: {e})")
    entries, why = read_manifest(path)
    if why:
        problems.append(why)
    elif not problems and (missing := sorted(listed - set(entries))):
        problems.append(f"{MANIFEST} does not list {', '.join(missing)}")
    return entries, problems


def verify_checkpoint(path: Path) -> list[str]:
    """What is wrong with checkpoint ``path`` (empty when it passes): meta.json, the manifest, and every file's size
    and checksum, read in this process (``train.checkpoint.verify_together`` shares the reading between ranks)."""
    entries, problems = checkpoint_entries(path)
    return problems or check_files(path, entries)


def require_passing(ckpt: Path, problems: list[str] | None = None) -> None:
    """CheckpointError unless ``ckpt`` passes :func:`verify_checkpoint` (for a checkpoint that is only read: nothing
    in its folder is moved). ``problems`` is the result of a check already made (by every rank together); None
    checks here."""
    if problems is None:
        problems = verify_checkpoint(ckpt)
    if problems:
        raise CheckpointError(f"checkpoint {ckpt} failed its check: {'; '.join(problems)}. Use another checkpoint "
                              f"folder (step_*)")
