"""Evaluation during training: held-out caption loss, captioning metrics and a linear probe, before the first step
of a fresh run, every ``eval.every`` steps and at the last step.

The trainer calls ``evaluator(step, model)`` at the end of each step (and with step 0 before the first); on a due
step it returns what that step's metrics row carries (below), otherwise ``{}``:

    val_loss, val_loss_tokens        caption-token mean loss over the eval.packs held-out packs (all ranks together)
    val_bleu4, val_cider,            greedy captions of the first eval.captions held-out images vs their true ones
      val_exact_match                  (genlip_fast.eval.caption_metrics)
    probe_top1, probe_train_top1     linear probe of the frozen encoder on eval.probe_train / eval.probe_val
    eval_time_s                      wall time of the evaluation (not part of the step's time)

What an evaluation never changes, so a run with it on trains bitwise like one with it off:
- the training data: the held-out packs come from a loader of their own over ``data.val_shards``, read once at the
  start (the same packs every time);
- random streams: the CPU, CUDA, Python and NumPy generator states are put back afterwards (nothing in it draws
  today, the model being in eval mode without drop path, but a later sampler or probe must not shift training);
- the optimizer and gradients: it runs under ``no_grad`` and restores the model's train/eval mode.
An evaluation reads only the weights and fixed inputs, so a resumed run's numbers equal an uninterrupted run's.

Ranks: the held-out packs are dealt to ranks (pack i to rank i % W) and the loss is the global token mean
(sum of token losses over all packs / their loss-token count, one all-reduce). FSDP needs every rank in every
forward, so each rank runs the same number of them (a rank short of packs runs a zero-weight one); captions and
probe features are computed by every rank on the same inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..checkpoint import rng_state, set_rng_state
from ..data.batch import PackedBatch, Sample
from ..data.pipeline import PackedLoader, build_data_loader
from ..data.tokenizer import Tokenizer
from ..eval import ImageFolder, caption_metrics, probe_encoder
from ..eval.captioning import scorers
from ..speak import ImageTransform, VisionEncoder, generate
from .config import ConfigError, JobConfig
from .distributed import DistInfo, all_reduce_sum, gathered_root

log = logging.getLogger("genlip_fast.train")


def held_out_loader(cfg: JobConfig, tokenizer: Tokenizer) -> PackedLoader:
    """One pass over ``data.val_shards`` through training's reader, checks, decode and packing, on the calling
    thread. Pillow decode, so the held-out inputs (and the evaluation's numbers) do not depend on whether DALI is
    installed; the run's pixel normalisation and geometry."""
    data = dataclasses.replace(cfg.data, train_shards=cfg.data.val_shards, sources=[], backend="host", prefetch=0)
    try:
        return build_data_loader(data, tokenizer, epochs=1)
    except (OSError, ValueError) as e:  # no shard there, compressed shards, a spec that does not expand
        raise ConfigError(f"data.val_shards = {cfg.data.val_shards!r}: {e}") from None


def _take(loader: PackedLoader, items, n: int) -> list:
    """The first ``n`` of ``items`` (the loader's packs or samples); the loader is closed after, and what it skipped
    is summed up in one line (each bad sample and shard was logged as it was met, as in training)."""
    try:
        return list(itertools.islice(items, n))
    finally:
        loader.close()
        st = loader.stats
        if st["skipped_total"] or st["bad_shards"]:
            log.warning("held-out data (data.val_shards): skipped %d bad samples %s and %d unreadable shards",
                        st["skipped_total"], st["skipped"], st["bad_shards"])


def held_out_packs(cfg: JobConfig, tokenizer: Tokenizer, n: int) -> list[PackedBatch]:
    """The first ``n`` packs of ``data.val_shards``, packed as training packs are."""
    loader = held_out_loader(cfg, tokenizer)
    return _take(loader, loader, n)


def held_out_samples(cfg: JobConfig, tokenizer: Tokenizer, n: int) -> list[Sample]:
    """The first ``n`` samples of ``data.val_shards`` in the loader's fixed (seeded) order, unpacked (for
    captioning): the same reader and decode as the held-out packs and as training."""
    if not cfg.data.val_shards or n <= 0:
        return []
    loader = held_out_loader(cfg, tokenizer)
    return _take(loader, loader.samples(), n)


@contextlib.contextmanager
def _whole_root(model: nn.Module):
    """:func:`gathered_root` once FSDP2 has set the root up. FSDP2 does that in the root's first forward; captions
    and probe features bypass that forward and may come first (an evaluation before the first step with
    ``eval.packs = 0``), where on two or more ranks the first block's prefetch would find no communication set up."""
    if isinstance(model, FSDPModule):
        model._get_fsdp_state()._lazy_init()  # what the root's first forward does first; a no-op after it
    with gathered_root(model):
        yield


def _rank0_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Every rank goes on with rank 0's tokens (see :func:`generate_captions`)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tokens, src=0)
    return tokens


def generate_captions(model: nn.Module, samples: list[Sample], tokenizer: Tokenizer, max_new_tokens: int) -> list[str]:
    """Greedy captions of the samples' images, through the KV-cache captioner (:func:`genlip_fast.speak.generate`).

    Every rank calls it with the same samples. Under FSDP the root's own weights are gathered for the call and each
    block gathers its weights in every forward, so all ranks must run the same forwards: they decode rank 0's token
    at each step (one small broadcast), and so agree on every caption and on when each one stops.
    """
    if not samples:
        return []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _whole_root(model):
            out = generate(model, [s.patches for s in samples], [s.grid_hw for s in samples],
                           stop_ids={tokenizer.eot_id}, max_new_tokens=max_new_tokens, agree=_rank0_tokens)
    finally:
        model.train(was_training)
    return [tokenizer.decode(ids) for ids in out]


def caption_heldout(model: nn.Module, cfg: JobConfig, tokenizer: Tokenizer) -> list[dict]:
    """Greedy captions for the first ``train.caption_samples`` held-out images, beside the true ones."""
    samples = held_out_samples(cfg, tokenizer, cfg.train.caption_samples)
    texts = generate_captions(model, samples, tokenizer, cfg.train.max_new_tokens)
    return [{"key": s.key, "true": tokenizer.decode(s.caption_ids.tolist()), "generated": g}
            for s, g in zip(samples, texts)]


def probe_folders(cfg: JobConfig) -> tuple[Path, Path] | None:
    """``(train, val)`` ImageFolders of the probe, ``"demo"`` resolved to the demo generator's ``DIR/probe/*``."""
    e = cfg.eval
    if not e.probe_train:
        return None
    demo = Path(cfg.data.train_shards).parent / "probe"
    return tuple(demo / split if p == "demo" else Path(p) for p, split in ((e.probe_train, "train"),
                                                                           (e.probe_val, "val")))


class Evaluator:
    """Periodic evaluation (see the module doc). Reads and checks everything it needs when built, so a missing
    folder or shard is a :class:`ConfigError` before the first step; ``history`` keeps this run's results."""

    def __init__(self, cfg: JobConfig, tokenizer: Tokenizer, info: DistInfo):
        e = cfg.eval
        self.cfg, self.tokenizer, self.info = cfg, tokenizer, info
        self.history: list[dict] = []
        self.mine: list[PackedBatch] = []
        self.slots = self.real = 0
        self.samples: list[Sample] = []
        self.probe = None
        if not e.every:
            return
        if (e.packs or e.captions) and not cfg.data.val_shards:
            log.warning("data.val_shards is '': no validation loss or captions at evaluations (eval.packs, "
                        "eval.captions)")
        if e.packs and cfg.data.val_shards:
            packs = held_out_packs(cfg, tokenizer, e.packs)
            if not packs:
                raise ConfigError(f"data.val_shards = {cfg.data.val_shards!r} holds no usable sample for eval.packs")
            if len(packs) < e.packs:
                log.warning("eval.packs = %d but data.val_shards fills only %d packs: evaluating those",
                            e.packs, len(packs))
            W = info.world_size
            self.slots = math.ceil(len(packs) / W)
            # a rank short of packs still joins every forward (FSDP), on a pack it then gives zero weight
            self.mine = packs[info.rank::W] or packs[:1]
            self.real = len(packs[info.rank::W])
        self.samples = held_out_samples(cfg, tokenizer, e.captions)
        if self.samples:
            try:
                scorers()
            except ImportError as err:
                raise ConfigError(f"eval.captions = {e.captions}: {err}") from None
        folders = probe_folders(cfg)
        if folders is not None:
            try:
                train = ImageFolder.read(folders[0])
                val = ImageFolder.read(folders[1], classes=train.classes)
                transform = ImageTransform.of_data(cfg.data)  # the run's geometry and pixel normalisation
                self.probe = (train, val, train.decode(transform), val.decode(transform))
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"eval.probe_train / eval.probe_val: {err}") from None

    def due(self, step: int) -> bool:
        """An evaluation after ``step`` (never when there is nothing to evaluate)."""
        e = self.cfg.eval
        something = self.slots or self.samples or self.probe is not None
        return bool(e.every and something) and (step % e.every == 0 or step == self.cfg.train.steps)

    def __call__(self, step: int, model: nn.Module) -> dict:
        if not self.due(step):
            return {}
        t0 = time.perf_counter()
        device = self.info.device
        saved_rng = rng_state(device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                row = self._evaluate(model)
        finally:
            model.train(was_training)
            set_rng_state(saved_rng, device)
        row["eval_time_s"] = time.perf_counter() - t0
        self.history.append({"step": step, **row})
        return row

    def _evaluate(self, model: nn.Module) -> dict:
        row: dict = {}
        device = self.info.device
        if self.slots:
            total = torch.zeros(2, dtype=torch.float64, device=device)
            for i in range(self.slots):
                pack = self.mine[min(i, len(self.mine) - 1)]
                weight = 1.0 if i < self.real else 0.0
                loss_sum = model(pack.to(device, non_blocking=True), loss_denominator=1.0)
                total[0] += weight * loss_sum.double()
                total[1] += weight * pack.num_loss_tokens
            loss_sum, count = all_reduce_sum(total).tolist()
            row["val_loss"], row["val_loss_tokens"] = loss_sum / max(1.0, count), int(count)
        if self.samples:
            generated = generate_captions(model, self.samples, self.tokenizer, self.cfg.train.max_new_tokens)
            refs = [self.tokenizer.decode(s.caption_ids.tolist()) for s in self.samples]
            scores = caption_metrics(refs, generated)
            row.update({f"val_{k}": v for k, v in scores.items()})
        if self.probe is not None:
            train, val, train_images, val_images = self.probe
            with _whole_root(model):
                res = probe_encoder(VisionEncoder(model, drop_text=False), train, val, train_images, val_images,
                                    l2=self.cfg.eval.probe_l2, max_tokens=self.cfg.data.pack_tokens)
            row["probe_top1"], row["probe_train_top1"] = res["top1"], res["train_top1"]
        return row


__all__ = ["Evaluator", "caption_heldout", "generate_captions", "held_out_loader", "held_out_packs",
           "held_out_samples", "probe_folders"]
