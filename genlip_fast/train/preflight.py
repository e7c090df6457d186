"""Start-up checks: the device, the backends, every input path, the output folders and the room for a checkpoint,
before any work.

Each problem is a :class:`~genlip_fast.train.config.ConfigError` naming the option to change; ``python -m
genlip_fast.train`` prints it as one line and exits 2. The checks that touch files run on every rank (a node may see
other files than rank 0 does) and the ranks agree on the result, so under torchrun every rank stops with the same
message instead of some ranks waiting for the others in a collective. Nothing is created: a folder that does not
exist yet is checked where it would be made (its nearest existing parent), and the write test leaves no file behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..checkpoint import list_checkpoints, read_meta, resolve_checkpoint
from ..data.config import data_sources
from ..data.specs import ShardSpecError, expand_spec
from ..data.storage import StorageSetupError
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..data.transforms import PIXEL_NORMS, pixel_stats
from . import float8
from .checkpoint import format_bytes, nearest_existing
from .config import ConfigError, JobConfig
from .distributed import all_gather_objects

log = logging.getLogger("genlip_fast.train")

NOT_SHAPE = ("attn_backend", "ce_backend", "drop_path")
"""Model config fields a checkpoint may be continued with a different value of (the weights' shapes stay)."""


def check_device(cfg: JobConfig) -> None:
    """``train.device`` and ``parallel.backend`` against what this process sees (before the process group)."""
    want, backend = cfg.train.device, cfg.parallel.backend
    has_cuda = torch.cuda.is_available()
    if want == "cuda" and not has_cuda:
        why = ("this PyTorch is a CPU build" if torch.version.cuda is None else
               f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}" if "CUDA_VISIBLE_DEVICES" in os.environ
               else "no GPU or driver found")
        raise ConfigError(f"train.device = 'cuda', but no CUDA device is visible ({why}); use --train.device=cpu "
                          f"or --train.device=auto")
    on_cuda = want == "cuda" or want == "auto" and has_cuda
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(f"this is local rank {local_rank}, but only {torch.cuda.device_count()} GPU(s) are visible: "
                          f"start at most that many processes per node (torchrun --nproc_per_node)")
    if backend == "nccl" and not on_cuda:
        raise ConfigError("parallel.backend = 'nccl' needs CUDA, and this run is on the CPU; use "
                          "--parallel.backend=gloo (or auto)")


def check_backends(cfg: JobConfig, device: torch.device) -> None:
    """An explicitly chosen backend that cannot run here is an error at start, naming what to install (the GPU
    presets choose them all: a missing piece must not fall back to a slow path for a whole run)."""
    from ..data.dali import dali_available
    from ..ops._dispatch import triton_unavailable_reason

    if cfg.data.backend == "dali" and not dali_available():
        raise ConfigError("data.backend = 'dali' but NVIDIA DALI is not installed: pip install '.[dali]' "
                          "(or --data.backend=host to decode with Pillow, several times slower)")
    if cfg.train.float8 != "off":
        reason = float8.unavailable_reason()
        if reason:
            raise ConfigError(f"train.float8 = {cfg.train.float8!r} cannot run here: {reason}")
        cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if cc is not None and cc < (8, 9):
            raise ConfigError(f"train.float8 = {cfg.train.float8!r} needs float8 tensor cores (compute capability "
                              f"8.9+: Ada, Hopper, Blackwell); this GPU's is {cc[0]}.{cc[1]}: --train.float8=off")
    for key in ("attn_backend", "ce_backend"):
        reason = triton_unavailable_reason(torch.empty(0, device=device))
        if getattr(cfg.model, key) == "triton" and reason:
            fix = ("pip install triton (CUDA builds of torch ship it)" if "not installed" in reason
                   else f"run on a GPU, or --model.{key}=auto")
            raise ConfigError(f"model.{key} = 'triton' cannot run here: {reason}; {fix}")


def tokenizer(cfg: JobConfig) -> Tokenizer:
    """The tokenizer ``data.tokenizer`` names, or a ConfigError saying why it cannot be loaded."""
    try:
        return load_tokenizer(cfg.data.tokenizer)
    except FileNotFoundError as e:
        raise ConfigError(f"data.tokenizer = {cfg.data.tokenizer!r}: {e}") from None
    except Exception as e:  # the tokenizers library raises plain Exceptions for a file it cannot parse
        raise ConfigError(f"data.tokenizer = {cfg.data.tokenizer!r} cannot be read as a tokenizer.json "
                          f"({type(e).__name__}: {e})") from None


def _write_problem(path: Path, option: str) -> str | None:
    """Why nothing can be written at ``path`` (checked at its nearest existing folder), or None."""
    where = nearest_existing(path)
    if not where.is_dir():
        return f"{option}: {where} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".genlip-write-test-") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"{option}: cannot write in {where} ({e.strerror or e})"
    return None


def agree(problems: list[str]) -> None:
    """Every rank raises the same ConfigError when any rank found a problem (all ranks call it)."""
    found = all_gather_objects(problems)
    merged: dict[str, list[int]] = {}
    for rank, ps in enumerate(found):
        for p in ps:
            merged.setdefault(p, []).append(rank)
    if merged:
        everywhere = len(found)
        raise ConfigError("; ".join(p if len(r) == everywhere else f"{p} (rank {', '.join(map(str, r))})"
                                    for p, r in merged.items()))


def check_inputs(cfg: JobConfig, out_dir: Path, ckpt_root: Path) -> None:
    """Training and held-out shards, the output and checkpoint folders (writable), and a fresh run not writing
    among an earlier run's checkpoints. Every rank calls it; all raise together."""
    problems = []
    d = cfg.data
    try:
        specs = [(f"data.sources[{i}].path" if d.sources else "data.train_shards", s.spec)
                 for i, s in enumerate(data_sources(d))]
    except ValueError as e:
        specs, problems = [], [str(e)]
    for option, spec in specs + ([("data.val_shards", d.val_shards)] if d.val_shards else []):
        try:
            expand_spec(spec)
        except (ShardSpecError, OSError, StorageSetupError) as e:  # missing, compressed, unreachable, no credentials
            hint = " (--data.val_shards='' evaluates and captions nothing)" if option == "data.val_shards" else ""
            problems.append(f"{option} = {spec!r}: {e}{hint}")
    ckpt_option = "checkpoint.dir" if cfg.checkpoint.dir else "train.out_dir (checkpoints go to its checkpoints/)"
    for path, option in ((out_dir, "train.out_dir"), (ckpt_root, ckpt_option)):
        if option == "train.out_dir" or nearest_existing(ckpt_root) != nearest_existing(out_dir):
            problems += filter(None, [_write_problem(path, option)])
    try:
        found = [] if cfg.checkpoint.resume else list_checkpoints(ckpt_root)
    except OSError as e:
        found, problems = [], [*problems, f"{ckpt_option}: cannot list {ckpt_root} ({e.strerror or e})"]
    if found:
        problems.append(f"checkpoint.resume = false, but {ckpt_root} already holds checkpoints (newest: "
                        f"{found[-1].name}); a fresh run would write among them. Give it its own --train.out_dir "
                        f"or --checkpoint.dir, or move them away")
    agree(problems)


def _space_problem(ckpt_root: Path, need: int, keep: int) -> str | None:
    free = shutil.disk_usage(nearest_existing(ckpt_root)).free
    if free < need:
        return (f"{ckpt_root} has {format_bytes(free)} free, not enough for one checkpoint (≈ {format_bytes(need)}; "
                f"checkpoint.keep={keep} needs ≈ {format_bytes((keep + 1) * need)}). Free space, or set "
                f"checkpoint.dir to a larger disk")
    kept = sum(f.stat().st_size for c in list_checkpoints(ckpt_root) for f in c.iterdir() if f.is_file())
    if free + kept < (keep + 1) * need:
        log.warning("%s has %s free: enough for %d more checkpoint(s) of ≈ %s, but checkpoint.keep=%d needs ≈ %s in "
                    "all; the run will stop with a clear error when a save finds no space", ckpt_root,
                    format_bytes(free), int(free // max(need, 1)), format_bytes(need), keep,
                    format_bytes((keep + 1) * need))
    return None


def check_space(ckpt_root: Path, need: int, keep: int, *, rank: int) -> None:
    """Room for one checkpoint of ``need`` bytes where checkpoints go (rank 0 measures; all ranks call it); a
    warning when ``keep`` + 1 of them will not fit."""
    problem = None
    if rank == 0:
        try:
            problem = _space_problem(ckpt_root, need, keep)
        except OSError as e:
            problem = f"cannot measure the free space of {ckpt_root} ({e.strerror or e})"
    agree([problem] if problem else [])


def init_source(cfg: JobConfig) -> Path:
    """The checkpoint ``checkpoint.init_from`` points at."""
    try:
        return resolve_checkpoint(cfg.checkpoint.init_from)
    except FileNotFoundError as e:
        raise ConfigError(f"checkpoint.init_from = {cfg.checkpoint.init_from!r}: {e}") from None


def pixel_norm_of(meta: dict) -> str | None:
    """The ``data.pixel_norm`` a checkpoint's weights were trained with: its run's (a run before the option:
    'clip'), or for an imported checkpoint the name of its stored pixel statistics (None when they match none)."""
    if "inputs" in meta:
        image = meta["inputs"].get("image", {})
        stats = pixel_stats((image.get("pixel_mean", PIXEL_NORMS["clip"][0]),
                             image.get("pixel_std", PIXEL_NORMS["clip"][1])))
        return next((name for name, known in PIXEL_NORMS.items() if known == stats), None)
    return (meta.get("job_config") or {}).get("data", {}).get("pixel_norm", "clip")


def check_compatible(path: Path, cfg: JobConfig, model_config, *, option: str) -> None:
    """A checkpoint's model against the one this run builds: the preset, the pixel normalisation its weights were
    trained with (``data.pixel_norm``), then every field that shapes a weight.
    ``option`` names how the checkpoint was chosen (resume or ``checkpoint.init_from``)."""
    meta = read_meta(path)
    saved = (meta.get("job_config") or {}).get("model", {}).get("preset")
    fix = ("give this run its own --train.out_dir (or --checkpoint.dir)" if option == "resume" else
           f"point {option} at a checkpoint of this model")
    if saved is not None and saved != cfg.model.preset:
        raise ConfigError(f"checkpoint {path} was made with preset {saved}, this run asks for {cfg.model.preset}: "
                          f"pass --model.preset={saved} to continue it, or {fix}")
    saved_norm = pixel_norm_of(meta)
    if saved_norm is None:
        log.warning("checkpoint %s was made with pixel statistics %s, which are no data.pixel_norm; this run "
                    "normalises as %r", path, meta["inputs"].get("image"), cfg.data.pixel_norm)
    elif saved_norm != cfg.data.pixel_norm:
        raise ConfigError(f"checkpoint {path} was trained on pixels normalised as data.pixel_norm = {saved_norm!r}, "
                          f"this run uses {cfg.data.pixel_norm!r}: pass --data.pixel_norm={saved_norm} to go on "
                          f"with the inputs its weights know, or {fix}")
    want = dataclasses.asdict(model_config)
    have = meta.get("model_config") or {}
    diff = [f"{k} {have[k]!r} vs {v!r}" for k, v in want.items()
            if k not in NOT_SHAPE and k in have and have[k] != (list(v) if isinstance(v, tuple) else v)]
    if diff:
        raise ConfigError(f"checkpoint {path} holds another model than this run builds (checkpoint vs run: "
                          f"{'; '.join(diff)}): change the model options back, or {fix}")


__all__ = ["agree", "check_backends", "check_compatible", "check_device", "check_inputs", "check_space", "init_source",
           "pixel_norm_of", "tokenizer"]
