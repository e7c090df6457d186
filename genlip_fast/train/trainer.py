"""The FSDP2 trainer: one process per GPU under torchrun, or one process on CPU for the demo.

One optimizer step (:mod:`~genlip_fast.train.step`)::

    every rank runs its packs of the global batch as its loaders make them     (data streams, see plan_batch)
        loss = sum(the pack's token losses); loss.backward()    (FSDP2 reduce-scatters after the last, as a sum)
    all_reduce(loss tokens, tokens, samples, FLOPs, stop votes, data failures, per-source counts, loss)
    gradients /= the global loss-token count; grad norm over the sharded model; clip
    finite? AdamW step (then float8's weight scales) : skip (no update, grads dropped, counted; too many in a row
        is an error)
    metrics (rank 0); checkpoint when due, at the end, or after a stop signal (voted at the end of every step)

Because every token loss enters with weight 1 and the summed gradients are divided by the same global count, the
update is the same whether a step's packs run on one rank or many: it equals one big batch's token-mean loss.

:func:`train` runs a :class:`Run`, whose :meth:`Run.run` lists the run's parts in order (build, resume, loaders,
the loop and its :meth:`Run._one_step`, the end).
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

from ..checkpoint import model_config_dict, rng_state, set_rng_state
from ..data import storage
from ..data.config import data_sources
from ..data.manifest import describe_dataset
from ..data.packing import pad_tokens
from ..data.pipeline import build_data_loader
from ..data.specs import NoShardsError, ShardSpecError, expand_spec, split_sources
from ..data.storage import StorageSetupError
from ..data.tokenizer import Tokenizer
from ..model import GenLIP, get_preset
from ..model.config import ModelConfig
from . import float8, preflight, runlog
from .checkpoint import Checkpointer, estimate_checkpoint_bytes, load_model_weights
from .config import ConfigError, JobConfig, to_dict
from .distributed import (
    DistInfo,
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    barrier,
    init_distributed,
    mixed_precision_policy,
    record_stop,
    shutdown,
    stop_recorded,
)
from .evaluate import Evaluator, caption_heldout
from .flops import device_peak_flops
from .metrics import MetricsLogger
from .schedule import warmup_cosine
from .signals import RunStopped, StopSignals, ignore_stop_signals
from .step import describe_plan, grad_norm_and_clip, padding_pack, plan_batch, train_step
from .watch import CollectiveError, describe_failure, step_done

# plan_batch and grad_norm_and_clip live in .step; imported from here by older callers (benchmarks)
__all__ = ["NonFiniteLossError", "Run", "grad_norm_and_clip", "plan_batch", "train"]

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
    """Generate the demo shapes dataset when ``data.generate_demo_data`` is on and ``data.train_shards`` (one
    source) matches nothing yet. Other problems with the training data are left to ``preflight.check_inputs``.

    Every rank checks (reads only, so all ranks fail alike); only ``write=True`` (rank 0) generates. The generator
    writes only into a new or empty folder and never over a file (``data.synthetic.demo_folder``), so a mistyped path
    is an error before anything is written, never a user's files replaced by demo data.
    """
    from ..data.synthetic import demo_folder, generate_probe_set, generate_shards

    d = cfg.data
    try:
        storage.configure(d.storage_options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if (not d.generate_demo_data or d.sources or len(split_sources(d.train_shards)) > 1
            or storage.is_remote(d.train_shards)):
        return
    try:
        expand_spec(d.train_shards)
        return
    except NoShardsError:
        pass  # the demo's place: generated below if it is a new or empty folder
    except (ShardSpecError, OSError, StorageSetupError):
        return
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
    "signal", "checkpoint", "evals"}``; ``losses`` and ``evals`` are this run's (a resumed run starts after its
    checkpoint).

    Raises :class:`~genlip_fast.train.signals.RunStopped` in workers torchrun restarted after a stop signal ended
    the run (a stop is final), and :class:`~genlip_fast.train.watch.CollectiveError` naming the ranks behind
    when a collective times out or loses a rank."""
    preflight.check_device(cfg)
    par = cfg.parallel
    info = init_distributed(cfg.train.device, par.backend, replicate=par.replicate, shard=par.shard,
                            timeout_s=par.collective_timeout_s)
    run = None
    try:
        stopped = stop_recorded()
        if stopped is not None:
            ignore_stop_signals()  # torchrun SIGTERMs the others as soon as one of us exits
            barrier()
            raise RunStopped(stopped)
        with StopSignals() as signals:
            run = Run(cfg, info, signals, progress)
            result = run.run()
        if result["stopped_by"] == "signal" and info.is_main:
            record_stop(128 + result["signal"])
        return result
    except Exception as e:
        line = describe_failure(e)
        if line is None:
            raise
        raise CollectiveError(line) from e
    finally:
        runlog.detach(getattr(run, "log_handler", None))
        shutdown(info)


class Run:
    """One training run on this rank. :meth:`run` is the whole of it, one named step after another::

        _prepare         checks (backends, inputs, output folders), tokenizer, demo data, model config, and which
                         checkpoint to continue (or start from); nothing is written before these pass
        _build_model     GenLIP -> float8 linears -> activation checkpointing -> compile -> FSDP2, AdamW; then
                         per-rank seeds
        _resume          room for a checkpoint; weights and optimizer from the checkpoint (or init_from weights)
        _build_loaders   the batch plan and one loader per data stream, at the checkpoint's positions; RNG states
        _open_logs       evaluator, the rank's log file, config.json, metrics and the start-up lines
        _loop            _one_step per optimizer step; evaluation, metrics, checkpoints, stopping
        _finish          close the loaders (bad-input summary), captions of held-out images
    """

    def __init__(self, cfg: JobConfig, info: DistInfo, signals: StopSignals, progress: bool):
        self.cfg, self.info, self.signals, self.progress = cfg, info, signals, progress
        self.device = info.device
        self.losses: list[float] = []
        self.stopped_by: str | None = None

    def run(self) -> dict:
        self._prepare()
        self._build_model()
        self._resume()
        self._build_loaders()
        self._open_logs()
        self._loop()
        return self._finish()

    def _prepare(self) -> None:
        """Everything checked before anything is built or written; the model config; the checkpoint to continue
        (``latest``) or to take the weights of (``init_src``)."""
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        preflight.check_backends(cfg, self.device)
        self.tokenizer = preflight.tokenizer(cfg)
        ensure_demo_data(cfg, write=info.is_main)
        barrier()
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.out_dir / "checkpoints"
        preflight.check_inputs(cfg, self.out_dir, self.ckpt_root)
        self.mcfg = build_model_config(cfg, self.tokenizer)
        self.ckpt = Checkpointer(self.ckpt_root, info.rank, info.world_size, keep=cfg.checkpoint.keep)
        latest = self.ckpt.select_resume(fallback=cfg.checkpoint.fallback) if cfg.checkpoint.resume else None
        init_src = preflight.init_source(cfg) if latest is None and cfg.checkpoint.init_from else None
        if latest or init_src:
            preflight.check_compatible(latest or init_src, cfg, self.mcfg,
                                       option="resume" if latest else "checkpoint.init_from")
        self.latest, self.init_src = latest, init_src

    def _build_model(self) -> None:
        """The same initial weights on every rank, wrapped for training; then each rank's own random streams."""
        cfg, device = self.cfg, self.device
        if device.type == "cuda":
            with torch.device(device):
                model = GenLIP(self.mcfg)
        else:
            model = GenLIP(self.mcfg)
        self.float8 = float8.convert(  # before wrapping it
            model, cfg.train.float8, cfg.train.float8_filter, emulate=device.type != "cuda",
            gather_blocked_by=float8.all_gather_blocked(cfg.parallel.compile, cfg.model.attn_backend, device))
        self.checkpointed = apply_activation_checkpointing(model, cfg.parallel.activation_checkpoint,
                                                           cfg.parallel.ac_ratio)
        if cfg.parallel.compile:
            apply_compile(model)
        self.mp = mixed_precision_policy(cfg.parallel.mixed_precision, device)
        apply_fsdp(model, self.info.mesh, self.mp, reshard_after_forward=cfg.parallel.reshard_after_forward)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = build_optimizer(cfg, model, device)
        # Drop path and anything else random differ per rank from here on.
        torch.manual_seed(cfg.train.seed * 1_000_003 + 7919 * (self.info.rank + 1))
        random.seed(cfg.train.seed + self.info.rank)

    def _resume(self) -> None:
        """Weights and optimizer state from the checkpoint (or weights only from ``checkpoint.init_from``)."""
        cfg = self.cfg
        need = estimate_checkpoint_bytes(self.model, self.opt, world_size=self.info.world_size)
        preflight.check_space(self.ckpt_root, need, cfg.checkpoint.keep, rank=self.info.rank)
        self.resumed_meta, self.data_states, self.rng = None, {}, None
        if self.latest is not None:
            self.resumed_meta, self.data_states, self.rng = self.ckpt.load(self.latest, self.model, self.opt,
                                                                           device=self.device)
            log.info("resuming from %s (step %d)", self.latest, self.resumed_meta["step"])
        elif self.init_src is not None:
            load_model_weights(self.init_src, self.model)
            log.info("model weights from %s; optimizer, schedule and data start fresh", self.init_src)
        self.start_step = self.resumed_meta["step"] if self.resumed_meta else 0

    def _build_loaders(self) -> None:
        """The batch plan, this rank's data streams at the checkpoint's positions, and the checkpoint's random
        states (restored last, after everything that is built from them)."""
        self.sources = data_sources(self.cfg.data)
        self.plan = plan = plan_batch(self.cfg, self.info, self.tokenizer, self.resumed_meta)
        self.loaders = {s: build_data_loader(self.cfg.data, self.tokenizer, rank=s, world_size=plan.data_streams,
                                             device=self.device) for s in plan.streams}
        for loader in self.loaders.values():  # a stop signal ends a wait for data (see train_step)
            loader.interrupt = lambda: self.signals.received is not None
        if self.resumed_meta is None:
            return
        for s, loader in self.loaders.items():
            if plan.remapped_from is not None:
                carried = loader.load_remapped(self.data_states)
                log.info("data stream %d continues streams %s: %d open shards, %d held samples", s,
                         carried["from_streams"], carried["lanes"], carried["held"])
                continue
            if s not in self.data_states:
                raise RuntimeError(f"checkpoint {self.latest} has no data-loader state for stream {s}")
            loader.load_state_dict(self.data_states[s])
        if self.rng is not None:
            set_rng_state(self.rng, self.device)
        else:
            log.warning("world size changed since the checkpoint: random streams (drop path) are reseeded")

    def _open_logs(self) -> None:
        """The evaluator (it reads and checks the held-out data and probe folders), the rank's log file
        (:mod:`~genlip_fast.train.runlog`), config.json, the metrics logger and the run's first lines; the meta every
        checkpoint carries."""
        cfg, info, plan = self.cfg, self.info, self.plan
        self.evaluator = Evaluator(cfg, self.tokenizer, info)
        self.log_handler = runlog.attach(self.out_dir, info.rank)
        if info.is_main:
            (self.out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        self.metrics = metrics = MetricsLogger(self.out_dir, enabled=info.is_main, total_steps=cfg.train.steps,
                                               start_step=self.start_step, progress=self.progress,
                                               tensorboard=cfg.train.tensorboard, log_every=cfg.train.log_every)
        metrics.message(
            f"{info.world_size} rank(s) on {self.device.type} ({info.mesh_desc}); precision {self.mp.param_dtype}; "
            f"activation checkpointing on {len(self.checkpointed)}/{len(self.model.blocks)} blocks"
            + ("; compiled blocks" if cfg.parallel.compile else ""))
        if cfg.train.float8 != "off":
            metrics.message(self.float8.describe())
        for source in self.sources:
            line = describe_dataset(expand_spec(source.spec))
            metrics.message(line if len(self.sources) == 1 else
                            f"source {source.name!r} (weight {source.weight:g}, caption {source.rule.text}): {line}")
        metrics.message(describe_plan(plan, cfg))
        if plan.remapped_from is not None:
            metrics.message(
                f"data: the checkpoint's {plan.remapped_from} stream positions continue on {plan.data_streams} "
                "streams (parallel.remap_streams): every sample read before the checkpoint stays read and none is "
                "read twice in its epoch, and the samples the packers held are packed again; approximated: the "
                "order in which the open shards' samples are drawn and which samples share a pack differ from an "
                "uninterrupted run", logging.WARNING)
        self.meta = {"packs_per_step": plan.packs_per_step, "data_streams": plan.data_streams,
                     "samples_per_pack": plan.samples_per_pack, "model_config": model_config_dict(self.mcfg),
                     "job_config": to_dict(cfg)}

    def _save(self, step: int, states: dict[int, dict] | None = None) -> Path:
        """A checkpoint after ``step``: weights, optimizer, data positions (``states``, or the loaders' own), RNG
        states, meta."""
        states = states or {s: loader.state_dict() for s, loader in self.loaders.items()}
        path = self.ckpt.save(step, self.model, self.opt, data_states=states, meta=self.meta, device=self.device)
        self.saved_step = step
        self.metrics.message(f"checkpoint {path}")
        return path

    def _loop(self) -> None:
        """Optimizer steps until ``train.steps``, a stop signal or ``train.stop_at_step``, with a checkpoint when one
        is due and at the end; an evaluation first when a fresh run has one due at step 0."""
        cfg = self.cfg
        self.pad = pad_tokens(padding_pack(self.mcfg, self.tokenizer), self.float8.token_multiple).to(self.device)
        self.peak = device_peak_flops(self.device)
        self.bad_in_a_row = 0
        self.last_ckpt = self.latest
        self.step = self.saved_step = self.start_step
        step_done(self.start_step)  # a resumed run's hang reports start from its checkpoint's step
        if self.start_step == 0 and self.evaluator.due(0):
            self.metrics.log({"step": 0, **self.evaluator(0, self.model)})  # the untrained model: where curves start
        while self.step < cfg.train.steps:
            if not self._one_step():
                self._stop_in_data_wait()
                break
            self.stopped_by = self._stop_reason()
            due = cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0
            if due or self.stopped_by or (self.step == cfg.train.steps and cfg.checkpoint.final):
                self.last_ckpt = self._save(self.step)
            if self.stopped_by:
                self.metrics.message(f"stopped after step {self.step} ({self.stopped_by}); checkpoint saved — rerun "
                                     f"the same command to continue", logging.WARNING)
                break
        self.metrics.close()

    def _stop_in_data_wait(self) -> None:
        """A stop signal cut a rank's wait for data short: the step in flight is dropped, and the run ends with a
        checkpoint of the last finished step — its data positions and random states as they were when the dropped
        step began, so the resumed run is exact — unless that step is saved already (or is the start)."""
        self.stopped_by = "signal"
        states, rng = self.step_start
        if self.step > self.saved_step:
            set_rng_state(rng, self.device)
            self.last_ckpt = self._save(self.step, states)
            saved = "checkpoint saved"
        else:
            saved = "nothing new to save"
        self.metrics.message(f"stopped while waiting for data in step {self.step + 1}, which is dropped; {saved} "
                             f"after step {self.step} — rerun the same command to continue", logging.WARNING)

    def _one_step(self) -> bool:
        """One optimizer step (:func:`~genlip_fast.train.step.train_step`), the AdamW update unless it was not
        finite, then the evaluation when one is due and the metrics row. False when a stop signal cut a wait for
        data short (the step is dropped: no update, nothing logged)."""
        cfg, plan, opt, step = self.cfg, self.plan, self.opt, self.step
        self.step_start = ({s: loader.state_dict() for s, loader in self.loaders.items()}, rng_state(self.device))
        t_step = time.perf_counter()
        lr = warmup_cosine(step, total_steps=cfg.train.steps, peak_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                           warmup_ratio=cfg.optim.warmup_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        st = train_step(self.model, self.params, [self.loaders[k] for k in plan.packs_of(step)],
                        plan.micro_steps(step), pad=self.pad, mcfg=self.mcfg, device=self.device,
                        max_norm=cfg.optim.grad_clip, token_multiple=self.float8.token_multiple,
                        stop_requested=lambda: self.signals.received is not None, counts=self._source_counts)
        if st.interrupted:
            opt.zero_grad(set_to_none=True)
            return False
        loss_value, gnorm_value = st.loss, st.grad_norm
        finite = math.isfinite(loss_value) and math.isfinite(gnorm_value)
        if finite:
            opt.step()
            self.float8.after_optimizer_step(self.model)
            self.bad_in_a_row = 0
        else:
            self.bad_in_a_row += 1
            self.metrics.message(f"step {step + 1}: loss {loss_value}, grad norm {gnorm_value}: skipped (no update; "
                                 f"{self.bad_in_a_row} in a row)", logging.WARNING)
        opt.zero_grad(set_to_none=True)
        if self.bad_in_a_row >= cfg.train.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_in_a_row} optimizer steps in a row (up to step {step + 1}) had a non-finite loss or "
                f"gradient norm (loss {loss_value}, grad norm {gnorm_value}); stopping. The newest checkpoint that "
                f"passed its check is {self.last_ckpt or 'none'}. Check the data, lower optim.lr, or raise "
                f"train.max_bad_steps.")
        self.step = step = step + 1
        step_done(step)
        self.losses.append(loss_value)
        self.stop_votes = st.stop_votes

        dt = time.perf_counter() - t_step
        evals = self.evaluator(step, self.model)  # {} unless due; outside the step's time
        ws, peak = self.info.world_size, self.peak
        self.metrics.log({
            "step": step, "loss": loss_value, "lr": lr, "grad_norm": gnorm_value, "skipped": not finite,
            "tokens": st.tokens, "samples": st.samples, "packs": plan.packs_per_step,
            "tokens_per_s": st.tokens / dt, "samples_per_s": st.samples / dt,
            "mfu": st.flops / (dt * ws * peak) if peak else None,
            "tflops_per_rank": st.flops / dt / ws / 1e12,
            "peak_mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None,
            "data_wait_s": st.data_wait_s, "step_time_s": dt, **self._source_row(st.counts), **evals,
        })
        return True

    def _stop_reason(self) -> str | None:
        """Why the run stops after this step before its end: a stop signal any rank voted for, or
        ``train.stop_at_step``; None to go on."""
        cfg = self.cfg
        if self.stop_votes > 0:
            return "signal"
        if cfg.train.stop_at_step and cfg.train.stop_at_step <= self.step < cfg.train.steps:
            return "stop_at_step"
        return None

    def _source_counts(self) -> list[float]:
        """This rank's samples handed out and records skipped so far, per source (for a mixture; [] otherwise)."""
        if len(self.sources) == 1:
            return []
        stats = [loader.stats["sources"] for loader in self.loaders.values()]
        return ([float(sum(st[s.name]["samples"] for st in stats)) for s in self.sources]
                + [float(sum(st[s.name]["skipped_total"] for st in stats)) for s in self.sources])

    def _source_row(self, counts: list[float]) -> dict:
        """``source_NAME_samples`` / ``source_NAME_skipped`` over all ranks since the run began (a mixture's)."""
        n = len(self.sources)
        return {f"source_{s.name}_{what}": int(counts[i * n + k]) for i, what in enumerate(("samples", "skipped"))
                for k, s in enumerate(self.sources)} if counts else {}

    def _finish(self) -> dict:
        """Close the loaders (what they skipped, one line), caption held-out images after a complete run, and
        return :func:`train`'s result."""
        skipped: dict[str, int] = {}
        by_source: dict[str, dict[str, int]] = {s.name: {} for s in self.sources}
        bad_shards = 0
        for loader in self.loaders.values():
            loader.close()
            stats = loader.stats
            bad_shards += stats["bad_shards"]
            for name, src in stats["sources"].items():
                for reason, n in src["skipped"].items():
                    skipped[reason] = skipped.get(reason, 0) + n
                    by_source[name][reason] = by_source[name].get(reason, 0) + n
        if skipped or bad_shards:
            log.warning("skipped %d bad samples and %d unreadable shards on rank %d: %s", sum(skipped.values()),
                        bad_shards, self.info.rank, skipped if len(self.sources) == 1 else
                        {name: counts for name, counts in by_source.items() if counts})
        done = self.stopped_by is None and self.step == self.cfg.train.steps
        captions = caption_heldout(self.model, self.cfg, self.tokenizer) if done else []
        return {"losses": self.losses, "captions": captions, "model": self.model, "step": self.step,
                "stopped_by": self.stopped_by,
                "signal": self.signals.agreed(self.device) if self.stopped_by == "signal" else None,
                "checkpoint": self.last_ckpt, "evals": self.evaluator.history}
