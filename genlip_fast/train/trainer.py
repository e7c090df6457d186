"""The FSDP2 trainer: one process per GPU under torchrun, or one process on CPU for the demo.

One optimizer step::

    every rank draws its packs of the global batch  (data streams, see plan_batch)
    all_reduce(loss tokens, tokens, samples, FLOPs, stop flag)        -> the global loss-token count
    for each of its packs: loss = sum(token losses) / global count; loss.backward()   (FSDP2 reduce-scatters, sum)
    all_reduce(loss); grad norm over the sharded model; clip
    finite? AdamW step : skip (no update, grads dropped, counted; too many in a row is an error)
    metrics (rank 0); checkpoint when due, at the end, or after SIGTERM / SIGUSR1

Because every pack's loss is divided by the same global count and gradients are summed, the update is the same
whether a step's packs run on one rank or many: it equals one big batch's token-mean loss.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from ..data.pipeline import build_data_loader
from ..data.tokenizer import Tokenizer
from ..model import GenLIP, get_preset
from ..model.config import ModelConfig
from . import preflight
from .checkpoint import Checkpointer, estimate_checkpoint_bytes, load_model_weights, set_rng_state
from .config import ConfigError, JobConfig, to_dict
from .distributed import (
    DistInfo,
    all_reduce_sum,
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    barrier,
    broadcast_object,
    init_distributed,
    mixed_precision_policy,
    prepare_micro_step,
    shutdown,
)
from .evaluate import Evaluator, caption_heldout
from .flops import device_peak_flops, pack_flops
from .metrics import MetricsLogger
from .schedule import warmup_cosine
from .signals import StopSignals

log = logging.getLogger("genlip_fast.train")

PACKS_MEASURED = 16
"""Packs read from stream 0 to measure samples per pack when train.tokens_per_sample is 0."""


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient norm."""


def build_model_config(cfg: JobConfig, tokenizer: Tokenizer) -> ModelConfig:
    m = cfg.model
    over = {"attn_backend": m.attn_backend, "ce_backend": m.ce_backend}
    if m.vocab_size is not None:
        over["vocab_size"] = m.vocab_size
    elif m.preset.startswith("tiny"):
        over["vocab_size"] = tokenizer.vocab_size
    elif tokenizer.vocab_size > get_preset(m.preset).vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} entries, more than the model's vocab")
    if m.drop_path is not None:
        over["drop_path"] = m.drop_path
    for key in ("gate", "mlp_bias", "drop_path_mode", "drop_path_schedule"):
        if getattr(m, key) is not None:
            over[key] = getattr(m, key)
    return get_preset(m.preset, **over)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases, layer scales and embeddings get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def ensure_demo_data(cfg: JobConfig, *, write: bool) -> None:
    """Generate the demo shapes dataset when ``data.generate_demo_data`` is on and ``data.train_shards`` matches
    nothing yet; otherwise a missing shard is a ``ConfigError`` naming the path.

    Every rank checks (reads only, so all ranks fail alike); only ``write=True`` (rank 0) generates. The generator
    writes only into a new or empty folder and never over a file (``data.synthetic.demo_folder``), so a mistyped path
    is an error before anything is written, never a user's files replaced by demo data.
    """
    from ..data.synthetic import demo_folder, generate_probe_set, generate_shards
    from ..data.webdataset import expand_shards

    try:
        expand_shards(cfg.data.train_shards)
        return
    except FileNotFoundError as e:
        if not cfg.data.generate_demo_data:
            raise ConfigError(f"data.train_shards = {cfg.data.train_shards!r}: {e}") from None
    try:
        out = demo_folder(cfg.data.train_shards, cfg.data.val_shards)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if write:
        log.info("generating the shapes dataset in %s", out)
        generate_shards(out, size=cfg.data.image_size, seed=cfg.data.seed)
        generate_probe_set(out / "probe", size=cfg.data.image_size, seed=cfg.data.seed)  # eval.probe_* = "demo"


@dataclass
class BatchPlan:
    """How one optimizer step's global batch is drawn.

    The global batch is ``packs_per_step`` packs: ``packs_per_stream`` from each of ``data_streams`` loaders, where
    stream ``s`` is ``build_data_loader(..., rank=s, world_size=data_streams)``. Rank ``r`` of ``W`` reads streams
    ``r, r + W, ...``, one pack from each in turn, and accumulates gradients over its ``packs_per_step / W`` packs.
    The streams, not the ranks, define the data: the same config on 1, 2 or 8 ranks trains on the same packs.
    """

    packs_per_step: int
    data_streams: int
    streams: list[int] = field(default_factory=list)
    samples_per_pack: float | None = None
    """The estimate behind packs_per_step when it came from global_batch_samples."""

    @property
    def packs_per_stream(self) -> int:
        return self.packs_per_step // self.data_streams

    @property
    def micro_steps(self) -> int:
        return self.packs_per_stream * len(self.streams)


def measure_samples_per_pack(cfg: JobConfig, tokenizer: Tokenizer, data_streams: int) -> float:
    loader = build_data_loader(cfg.data, tokenizer, rank=0, world_size=data_streams)
    counts = [next(loader).num_samples for _ in range(PACKS_MEASURED)]
    return sum(counts) / len(counts)


def plan_batch(cfg: JobConfig, info: DistInfo, tokenizer: Tokenizer, resumed: dict | None = None) -> BatchPlan:
    """Packs per step from the config (fixed for the whole run; a resumed run keeps its checkpoint's plan).

    Rule, with the paper's global batch given in samples:
      ``samples_per_pack = floor(pack_tokens / tokens_per_sample)`` (whole samples fit; stage 1: 16384 // 270 = 60),
      or, with ``tokens_per_sample = 0``, the mean samples per pack of the first 16 packs of stream 0;
      ``packs_per_step = ceil(global_batch_samples / samples_per_pack)``, rounded up to a multiple of the data
      streams. ``train.packs_per_step`` > 0 sets it directly; with neither, one pack per stream.
    The samples in a step then vary a little with caption lengths; each step's count is logged.
    """
    t, W = cfg.train, info.world_size
    streams = cfg.parallel.data_streams
    if streams == 0 and resumed is not None and resumed.get("data_streams", 0) % W == 0:
        streams = resumed["data_streams"]  # keep the checkpoint's streams on a different number of ranks
    streams = streams or W
    if streams % W:
        raise ValueError(f"parallel.data_streams = {streams} is not a multiple of the world size {W}")
    if resumed is not None and resumed.get("data_streams") != streams:
        raise ValueError(f"the checkpoint was written with {resumed.get('data_streams')} data streams; set "
                         f"--parallel.data_streams={resumed.get('data_streams')} to continue it exactly")
    samples_per_pack = None
    if resumed is not None:
        packs = int(resumed["packs_per_step"])
        samples_per_pack = resumed.get("samples_per_pack")
    elif t.packs_per_step > 0:
        packs = t.packs_per_step
    elif t.global_batch_samples > 0:
        if t.tokens_per_sample > 0:
            samples_per_pack = max(1.0, float(math.floor(cfg.data.pack_tokens / t.tokens_per_sample)))
        else:
            samples_per_pack = broadcast_object(
                measure_samples_per_pack(cfg, tokenizer, streams) if info.is_main else None)
        packs = math.ceil(t.global_batch_samples / samples_per_pack)
    else:
        packs = streams
    packs = math.ceil(packs / streams) * streams
    return BatchPlan(packs, streams, list(range(info.rank, streams, W)), samples_per_pack)


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the (sharded) gradients; clipped to ``max_norm`` when it is finite and > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # sums the shards' partial norms across ranks
    if max_norm > 0 and torch.isfinite(norm):
        clip_grads_with_norm_(params, max_norm, norm)
    return norm


def train(cfg: JobConfig, *, progress: bool = True) -> dict:
    """Train on this rank (every rank calls it). Returns ``{"losses", "captions", "model", "step", "stopped_by",
    "checkpoint", "evals"}``; ``losses`` and ``evals`` are this run's (a resumed run starts after its checkpoint)."""
    preflight.check_device(cfg)
    par = cfg.parallel
    info = init_distributed(cfg.train.device, par.backend, replicate=par.replicate, shard=par.shard,
                            timeout_s=par.collective_timeout_s)
    try:
        with StopSignals() as signals:
            return _train(cfg, info, signals, progress)
    finally:
        shutdown(info)


def _train(cfg: JobConfig, info: DistInfo, signals: StopSignals, progress: bool) -> dict:
    device = info.device
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    tokenizer = preflight.tokenizer(cfg)
    ensure_demo_data(cfg, write=info.is_main)
    barrier()
    out_dir = Path(cfg.train.out_dir)
    ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out_dir / "checkpoints"
    preflight.check_inputs(cfg, out_dir, ckpt_root)
    mcfg = build_model_config(cfg, tokenizer)
    ckpt = Checkpointer(ckpt_root, info.rank, info.world_size, keep=cfg.checkpoint.keep)
    latest = ckpt.select_resume(fallback=cfg.checkpoint.fallback) if cfg.checkpoint.resume else None
    init_src = preflight.init_source(cfg) if latest is None and cfg.checkpoint.init_from else None
    if latest or init_src:
        preflight.check_compatible(latest or init_src, cfg, mcfg,
                                   option="resume" if latest else "checkpoint.init_from")
    if device.type == "cuda":
        with torch.device(device):
            model = GenLIP(mcfg)
    else:
        model = GenLIP(mcfg)
    picked = apply_activation_checkpointing(model, cfg.parallel.activation_checkpoint, cfg.parallel.ac_ratio)
    if cfg.parallel.compile:
        apply_compile(model)
    mp = mixed_precision_policy(cfg.parallel.mixed_precision, device)
    apply_fsdp(model, info.mesh, mp, reshard_after_forward=cfg.parallel.reshard_after_forward)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            eps=cfg.optim.eps, fused=device.type == "cuda")
    # Drop path and anything else random differ per rank from here on.
    torch.manual_seed(cfg.train.seed * 1_000_003 + 7919 * (info.rank + 1))
    random.seed(cfg.train.seed + info.rank)

    preflight.check_space(ckpt_root, estimate_checkpoint_bytes(model, opt), cfg.checkpoint.keep, rank=info.rank)
    resumed_meta, data_states, rng = None, {}, None
    if latest is not None:
        resumed_meta, data_states, rng = ckpt.load(latest, model, opt, device=device)
        log.info("resuming from %s (step %d)", latest, resumed_meta["step"])
    elif init_src is not None:
        load_model_weights(init_src, model)
        log.info("model weights from %s; optimizer, schedule and data start fresh", init_src)
    start_step = resumed_meta["step"] if resumed_meta else 0

    plan = plan_batch(cfg, info, tokenizer, resumed_meta)
    loaders = {s: build_data_loader(cfg.data, tokenizer, rank=s, world_size=plan.data_streams) for s in plan.streams}
    if resumed_meta is not None:
        for s, loader in loaders.items():
            if s not in data_states:
                raise RuntimeError(f"checkpoint {latest} has no data-loader state for stream {s}")
            loader.load_state_dict(data_states[s])
        if rng is not None:
            set_rng_state(rng, device)
        else:
            log.warning("world size changed since the checkpoint: random streams (drop path) are reseeded")

    evaluator = Evaluator(cfg, tokenizer, info)  # reads and checks the held-out data and probe folders
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    metrics = MetricsLogger(out_dir, enabled=info.is_main, total_steps=cfg.train.steps, start_step=start_step,
                            progress=progress, tensorboard=cfg.train.tensorboard, log_every=cfg.train.log_every)
    metrics.message(
        f"{info.world_size} rank(s) on {device.type} ({info.mesh_desc}); "
        f"{plan.packs_per_step} packs of {cfg.data.pack_tokens} tokens "
        f"per step from {plan.data_streams} data stream(s), {plan.micro_steps} per rank"
        + (f" (~{plan.samples_per_pack:g} samples/pack)" if plan.samples_per_pack else "")
        + f"; precision {mp.param_dtype}; activation checkpointing on {len(picked)}/{len(model.blocks)} blocks"
        + ("; compiled blocks" if cfg.parallel.compile else ""))
    meta = {"packs_per_step": plan.packs_per_step, "data_streams": plan.data_streams,
            "samples_per_pack": plan.samples_per_pack, "model_config": _model_config_dict(mcfg),
            "job_config": to_dict(cfg)}

    def save(step: int) -> Path:
        states = {s: loader.state_dict() for s, loader in loaders.items()}
        path = ckpt.save(step, model, opt, data_states=states, meta=meta, device=device)
        metrics.message(f"checkpoint {path}")
        return path

    peak = device_peak_flops(device)
    losses: list[float] = []
    bad_in_a_row = 0
    stopped_by = None
    last_ckpt = latest
    step = start_step
    if start_step == 0 and evaluator.due(0):
        metrics.log({"step": 0, **evaluator(0, model)})  # the untrained model: where the eval curves start
    while step < cfg.train.steps:
        t_step = time.perf_counter()
        lr = warmup_cosine(step, total_steps=cfg.train.steps, peak_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                           warmup_ratio=cfg.optim.warmup_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        t_data = time.perf_counter()
        packs = [next(loaders[s]) for _ in range(plan.packs_per_stream) for s in plan.streams]
        data_wait = time.perf_counter() - t_data

        counts = torch.tensor([
            sum(b.num_loss_tokens for b in packs),
            sum(int(b.cu_seqlens[-1]) for b in packs),
            sum(b.num_samples for b in packs),
            sum(pack_flops(mcfg, b) for b in packs),
            float(signals.received is not None),
        ], dtype=torch.float64, device=device)
        loss_tokens, tokens, samples, flops, stop_votes = all_reduce_sum(counts).tolist()

        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for i, b in enumerate(packs):
            prepare_micro_step(model, i, len(packs))  # no reshard or reduce until the last micro-step
            loss = model(b.to(device, non_blocking=True), loss_denominator=max(1.0, loss_tokens))
            loss.backward()
            loss_sum += loss.detach().float()
        all_reduce_sum(loss_sum)
        gnorm = grad_norm_and_clip(params, cfg.optim.grad_clip)
        loss_value, gnorm_value = loss_sum.item(), gnorm.item()
        finite = math.isfinite(loss_value) and math.isfinite(gnorm_value)
        if finite:
            opt.step()
            bad_in_a_row = 0
        else:
            bad_in_a_row += 1
            metrics.message(f"step {step + 1}: loss {loss_value}, grad norm {gnorm_value}: skipped (no update; "
                            f"{bad_in_a_row} in a row)", logging.WARNING)
        opt.zero_grad(set_to_none=True)
        if bad_in_a_row >= cfg.train.max_bad_steps:
            raise NonFiniteLossError(
                f"{bad_in_a_row} optimizer steps in a row (up to step {step + 1}) had a non-finite loss or gradient "
                f"norm (loss {loss_value}, grad norm {gnorm_value}); stopping. The newest checkpoint that passed its "
                f"check is {last_ckpt or 'none'}. Check the data, lower optim.lr, or raise train.max_bad_steps.")
        step += 1
        losses.append(loss_value)

        dt = time.perf_counter() - t_step
        evals = evaluator(step, model)  # {} unless due; outside the step's time
        metrics.log({
            "step": step, "loss": loss_value, "lr": lr, "grad_norm": gnorm_value, "skipped": not finite,
            "tokens": int(tokens), "samples": int(samples), "packs": plan.packs_per_step,
            "tokens_per_s": tokens / dt, "samples_per_s": samples / dt,
            "mfu": flops / (dt * info.world_size * peak) if peak else None,
            "tflops_per_rank": flops / dt / info.world_size / 1e12,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "data_wait_s": data_wait, "step_time_s": dt, **evals,
        })

        if stop_votes > 0:
            stopped_by = "signal"
        elif cfg.train.stop_at_step and step >= cfg.train.stop_at_step and step < cfg.train.steps:
            stopped_by = "stop_at_step"
        due = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
        if due or stopped_by or (step == cfg.train.steps and cfg.checkpoint.final):
            last_ckpt = save(step)
        if stopped_by:
            metrics.message(f"stopped after step {step} ({stopped_by}); checkpoint saved — rerun the same command "
                            f"to continue", logging.WARNING)
            break
    metrics.close()
    skipped: dict[str, int] = {}
    for loader in loaders.values():
        loader.close()
        for reason, n in loader.stats["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    if skipped:
        log.warning("skipped %d bad samples on rank %d: %s", sum(skipped.values()), info.rank, skipped)
    captions = caption_heldout(model, cfg, tokenizer) if stopped_by is None and step == cfg.train.steps else []
    return {"losses": losses, "captions": captions, "model": model, "step": step, "stopped_by": stopped_by,
            "signal": signals.agreed(device) if stopped_by == "signal" else None, "checkpoint": last_ckpt,
            "evals": evaluator.history}


def _model_config_dict(mcfg: ModelConfig) -> dict:
    d = dict(mcfg.__dict__)
    d["mrope_section"] = list(d["mrope_section"])
    return d
