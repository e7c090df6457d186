"""The FSDP2 trainer: one process per GPU under torchrun, or one process on CPU for the demo.

One optimizer step (:mod:`~genlip_fast.train.step`)::

    every rank runs its packs of the global batch as its loaders make them     (data streams, see plan_batch)
        loss = sum(the pack's token losses); loss.backward()    (FSDP2 reduce-scatters after the last, as a sum)
    all_reduce(loss tokens, tokens, samples, FLOPs, loss, stop votes); gradients /= the global loss-token count
    grad norm over the sharded model; clip
    finite? AdamW step : skip (no update, grads dropped, counted; too many in a row is an error)
    metrics (rank 0); checkpoint when due, at the end, or after SIGTERM / SIGUSR1 (voted at the end of every step)

Because every token loss enters with weight 1 and the summed gradients are divided by the same global count, the
update is the same whether a step's packs run on one rank or many: it equals one big batch's token-mean loss.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from torch import nn

from ..data.manifest import describe_dataset
from ..data.pipeline import build_data_loader
from ..data.tokenizer import Tokenizer
from ..data.webdataset import expand_shards
from ..model import GenLIP, get_preset
from ..model.config import ModelConfig
from . import preflight
from .checkpoint import Checkpointer, estimate_checkpoint_bytes, load_model_weights, set_rng_state
from .config import ConfigError, JobConfig, to_dict
from .distributed import (
    DistInfo,
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    barrier,
    broadcast_object,
    init_distributed,
    mixed_precision_policy,
    shutdown,
)
from .evaluate import Evaluator, caption_heldout
from .flops import device_peak_flops
from .metrics import MetricsLogger
from .schedule import warmup_cosine
from .signals import StopSignals
from .step import describe_plan, grad_norm_and_clip, padding_pack, plan_batch, train_step

# plan_batch and grad_norm_and_clip live in .step; imported from here by older callers (benchmarks)
__all__ = ["NonFiniteLossError", "grad_norm_and_clip", "plan_batch", "train"]

log = logging.getLogger("genlip_fast.train")


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


def check_backends(cfg: JobConfig, device: torch.device) -> None:
    """An explicitly chosen backend that cannot run here is an error at start, naming what to install (the GPU
    presets choose them all: a missing piece must not fall back to a slow path for a whole run)."""
    from ..data.dali import dali_available
    from ..ops._dispatch import triton_unavailable_reason

    if cfg.data.backend == "dali" and not dali_available():
        raise ConfigError("data.backend = 'dali' but NVIDIA DALI is not installed: pip install '.[dali]' "
                          "(or --data.backend=host to decode with Pillow, several times slower)")
    for key in ("attn_backend", "ce_backend"):
        reason = triton_unavailable_reason(torch.empty(0, device=device))
        if getattr(cfg.model, key) == "triton" and reason:
            fix = ("pip install triton (CUDA builds of torch ship it)" if "not installed" in reason
                   else f"run on a GPU, or --model.{key}=auto")
            raise ConfigError(f"model.{key} = 'triton' cannot run here: {reason}; {fix}")


def param_groups(model: nn.Module, weight_decay: float, decay: str = "matrices") -> list[dict]:
    """AdamW's parameter groups. ``decay="matrices"``: the linear layers' matrices decay; norms, biases, layer
    scales and the text and patch embeddings get no weight decay. ``"all"``: every parameter decays (the authors'
    AdamW, torch's default)."""
    if decay not in ("matrices", "all"):
        raise ValueError(f"decay must be 'matrices' or 'all', got {decay!r}")
    decay_params, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if decay == "matrices" and (p.dim() < 2 or "embed" in name):
            no_decay.append(p)
        else:
            decay_params.append(p)
    return [{"params": decay_params, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: JobConfig, model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with ``[optim]``'s settings (weight decay on what ``optim.decay``
    names); fused on CUDA."""
    o = cfg.optim
    return torch.optim.AdamW(param_groups(model, o.weight_decay, o.decay), lr=o.lr, betas=o.betas, eps=o.eps,
                             fused=device.type == "cuda")


def ensure_demo_data(cfg: JobConfig, *, write: bool) -> None:
    """Generate the demo shapes dataset when ``data.generate_demo_data`` is on and ``data.train_shards`` matches
    nothing yet; otherwise a missing shard is a ``ConfigError`` naming the path.

    Every rank checks (reads only, so all ranks fail alike); only ``write=True`` (rank 0) generates. The generator
    writes only into a new or empty folder and never over a file (``data.synthetic.demo_folder``), so a mistyped path
    is an error before anything is written, never a user's files replaced by demo data.
    """
    from ..data.synthetic import demo_folder, generate_probe_set, generate_shards

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
    check_backends(cfg, device)
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
    opt = build_optimizer(cfg, model, device)
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
    loaders = {s: build_data_loader(cfg.data, tokenizer, rank=s, world_size=plan.data_streams, device=device)
               for s in plan.streams}
    if resumed_meta is not None:
        for s, loader in loaders.items():
            if plan.remapped_from is not None:
                carried = loader.load_remapped(data_states)
                log.info("data stream %d continues streams %s: %d open shards, %d held samples", s,
                         carried["from_streams"], carried["lanes"], carried["held"])
                continue
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
        f"{info.world_size} rank(s) on {device.type} ({info.mesh_desc}); precision {mp.param_dtype}; activation "
        f"checkpointing on {len(picked)}/{len(model.blocks)} blocks"
        + ("; compiled blocks" if cfg.parallel.compile else ""))
    metrics.message(describe_dataset(expand_shards(cfg.data.train_shards)))
    metrics.message(describe_plan(plan, cfg))
    if plan.remapped_from is not None:
        metrics.message(
            f"data: the checkpoint's {plan.remapped_from} stream positions continue on {plan.data_streams} streams "
            "(parallel.remap_streams): every sample read before the checkpoint stays read and none is read twice in "
            "its epoch, and the samples the packers held are packed again; approximated: the order in which the "
            "open shards' samples are drawn and which samples share a pack differ from an uninterrupted run",
            logging.WARNING)
    meta = {"packs_per_step": plan.packs_per_step, "data_streams": plan.data_streams,
            "samples_per_pack": plan.samples_per_pack, "model_config": _model_config_dict(mcfg),
            "job_config": to_dict(cfg)}

    def save(step: int) -> Path:
        states = {s: loader.state_dict() for s, loader in loaders.items()}
        path = ckpt.save(step, model, opt, data_states=states, meta=meta, device=device)
        metrics.message(f"checkpoint {path}")
        return path

    pad = padding_pack(mcfg, tokenizer).to(device)
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
        st = train_step(model, params, [loaders[k] for k in plan.packs_of(step)], plan.micro_steps(step), pad=pad,
                        mcfg=mcfg, device=device, max_norm=cfg.optim.grad_clip,
                        stop_requested=lambda: signals.received is not None)
        loss_value, gnorm_value = st.loss, st.grad_norm
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
            "tokens": st.tokens, "samples": st.samples, "packs": plan.packs_per_step,
            "tokens_per_s": st.tokens / dt, "samples_per_s": st.samples / dt,
            "mfu": st.flops / (dt * info.world_size * peak) if peak else None,
            "tflops_per_rank": st.flops / dt / info.world_size / 1e12,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "data_wait_s": st.data_wait_s, "step_time_s": dt, **evals,
        })

        if st.stop_votes > 0:
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
    bad_shards = 0
    for loader in loaders.values():
        loader.close()
        bad_shards += loader.stats["bad_shards"]
        for reason, n in loader.stats["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    if skipped or bad_shards:
        log.warning("skipped %d bad samples and %d unreadable shards on rank %d: %s", sum(skipped.values()),
                    bad_shards, info.rank, skipped)
    captions = caption_heldout(model, cfg, tokenizer) if stopped_by is None and step == cfg.train.steps else []
    return {"losses": losses, "captions": captions, "model": model, "step": step, "stopped_by": stopped_by,
            "signal": signals.agreed(device) if stopped_by == "signal" else None, "checkpoint": last_ckpt,
            "evals": evaluator.history}


def _model_config_dict(mcfg: ModelConfig) -> dict:
    d = dict(mcfg.__dict__)
    d["mrope_section"] = list(d["mrope_section"])
    return d
