"""One optimizer step's batch and gradients: which packs each rank runs, streamed through its micro-steps.

The global batch is ``packs_per_step`` packs (:func:`plan_batch`). Each rank computes on a pack as soon as it is
made, while its loader makes the next ones::

    for each micro-step of this rank (the same number on every rank; a rank with fewer packs pads):
        pack = next(its stream)                 # the loader thread is already making the following ones
        (sum of the pack's token losses).backward()      # a padding micro-step: weight 0
        release the pack
    all_reduce([loss tokens, tokens, samples, FLOPs, stop votes, ..., loss sum])   # one collective, after the last
    gradients *= 1 / (the step's loss tokens, all ranks)                      # the token-mean loss of the batch
    global grad norm, clip; the caller checks it is finite and steps the optimizer

This equals dividing each pack's loss by the global count before its backward, which needed every pack of the step
read first (so the GPU waited for the whole step's data, and all packs sat in memory): the backward is linear in the
loss, so only rounding differs (``tests/test_train_step.py`` bounds it). The stop vote is read after the last
micro-step, so a stop signal is acted on at the end of the step it arrives in.

A rank whose stream fails (a dataset with no usable sample, a loader error) or whose wait for a pack is cut short by
a stop signal runs padding for the rest of the step, so every rank still meets every collective, and says so in
the same all-reduce: a failure is then raised on every rank alike (:class:`DataStreamError`), and an interrupted
wait drops the step on every rank (no update: :attr:`StepStats.interrupted`).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from ..data.batch import PackedBatch, Sample
from ..data.packing import pack_samples, pad_tokens
from ..data.pipeline import build_data_loader
from ..data.prefetch import DataWaitInterrupted
from ..data.sampler import EmptyDatasetError
from ..data.tokenizer import Tokenizer
from ..model.config import ModelConfig
from .config import ConfigError, JobConfig
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, broadcast_object, prepare_micro_step
from .flops import pack_flops

PACKS_MEASURED = 16
"""Packs read from stream 0 to measure samples per pack when train.tokens_per_sample is 0."""


class DataStreamError(RuntimeError):
    """A data stream failed; raised on every rank alike. ``code`` is the exit status: 2 for bad data (no usable
    sample in a whole pass, no readable shard), 1 for anything else."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def describe_data_failure(e: BaseException) -> tuple[int, str]:
    """``(exit status, one line)`` for an error raised by a data loader."""
    if isinstance(e, EmptyDatasetError):
        return 2, f"{e.option}: {e}"
    cause = e.__cause__ or e.__context__
    return 1, f"{type(e).__name__}: {e}" + (f": {type(cause).__name__}: {cause}" if cause else "")


def raise_agreed(failure: BaseException | None) -> None:
    """Every rank calls it after learning (from a collective) that some rank's stream failed: raises the first
    failing rank's :class:`DataStreamError` everywhere (chained to the original on that rank)."""
    reports = all_gather_objects(None if failure is None else describe_data_failure(failure))
    rank, (code, line) = next((r, x) for r, x in enumerate(reports) if x is not None)
    raise DataStreamError(line if len(reports) == 1 else f"rank {rank}: {line}", code) from failure


@dataclass
class BatchPlan:
    """How one optimizer step's global batch is drawn.

    The data is one sequence of packs interleaved from ``data_streams`` loaders: global pack ``g`` comes from stream
    ``g % data_streams`` (stream ``s`` is ``build_data_loader(..., rank=s, world_size=data_streams)``), and step
    ``t`` takes packs ``t * packs_per_step ...`` of it — exactly the requested number. Rank ``r`` of ``W`` reads the
    streams ``s`` with ``s % W == r``, so the same config on 1, 2 or 8 ranks trains on the same packs. Ranks may
    then hold different numbers of a step's packs; every rank runs :meth:`micro_steps` micro-steps (FSDP's
    collectives need the same count everywhere), the ones without a pack on a tiny loss-free padding pack.
    """

    packs_per_step: int
    data_streams: int
    world_size: int
    rank: int
    samples_per_pack: float | None = None
    """The estimate behind packs_per_step when it came from global_batch_samples."""
    remapped_from: int | None = None
    """The checkpoint's number of data streams when its positions are mapped onto ``data_streams``."""

    @property
    def streams(self) -> list[int]:
        """The streams this rank reads."""
        return list(range(self.rank, self.data_streams, self.world_size))

    def _streams_in(self, step: int) -> Iterator[int]:
        start = step * self.packs_per_step
        return (g % self.data_streams for g in range(start, start + self.packs_per_step))

    def packs_of(self, step: int) -> list[int]:
        """The stream of each of this rank's packs in ``step``, in order."""
        return [s for s in self._streams_in(step) if s % self.world_size == self.rank]

    def micro_steps(self, step: int) -> int:
        """Micro-steps every rank runs in ``step``: the most packs any rank holds."""
        return max(Counter(s % self.world_size for s in self._streams_in(step)).values())

    def padding_share(self) -> float:
        """Fraction of all ranks' micro-steps that are padding, over one cycle of the streams."""
        steps = self.data_streams // math.gcd(self.data_streams, self.packs_per_step)
        total = sum(self.micro_steps(t) for t in range(steps)) * self.world_size
        return 1.0 - steps * self.packs_per_step / total


def measure_samples_per_pack(cfg: JobConfig, tokenizer: Tokenizer, data_streams: int) -> float | tuple[int, str]:
    """Mean samples per pack of stream 0's first packs; ``(exit status, line)`` when the stream fails, for every
    rank to raise (only rank 0 measures)."""
    loader = build_data_loader(cfg.data, tokenizer, rank=0, world_size=data_streams)
    try:
        counts = [next(loader).num_samples for _ in range(PACKS_MEASURED)]
    except Exception as e:  # noqa: BLE001 - every rank raises it, below
        return describe_data_failure(e)
    finally:
        loader.close()
    return sum(counts) / len(counts)


def plan_batch(cfg: JobConfig, info: DistInfo, tokenizer: Tokenizer, resumed: dict | None = None) -> BatchPlan:
    """Packs per step and data streams (fixed for a run; a resumed run keeps its checkpoint's).

    Packs per step, with the paper's global batch given in samples:
      ``samples_per_pack = floor(pack_tokens / tokens_per_sample)`` (whole samples fit; stage 1: 16384 // 270 = 60),
      or, with ``tokens_per_sample = 0``, the mean samples per pack of the first 16 packs of stream 0;
      ``packs_per_step = ceil(global_batch_samples / samples_per_pack)`` — not rounded to the ranks: the batch is
      the one asked for. ``train.packs_per_step`` > 0 sets it directly; with neither, one pack per data stream.
    Data streams: ``parallel.data_streams`` (0 = one per rank), at least the world size. A resumed run keeps the
    checkpoint's streams when they spread evenly over the ranks; another number needs
    ``parallel.remap_streams = true`` (the saved positions are mapped, see ``PackedLoader.load_remapped``).
    """
    t, W = cfg.train, info.world_size
    wanted, saved = cfg.parallel.data_streams, (resumed or {}).get("data_streams")
    streams, remapped_from = wanted or W, None
    if saved is not None:
        if wanted == saved or (wanted == 0 and saved % W == 0):
            streams = saved  # the checkpoint's streams: continued exactly
        elif cfg.parallel.remap_streams:
            remapped_from = saved
        else:
            why = f"this run asks for {wanted}" if wanted else f"they do not spread evenly over {W} ranks"
            exact = (f", or --parallel.data_streams={saved} to continue exactly (ranks then read unequal numbers of "
                     "streams and some pad)") if saved >= W else ""
            raise ConfigError(f"the checkpoint's data comes from {saved} data streams and {why}: set "
                              f"--parallel.remap_streams=true to map the saved positions onto {streams} streams (no "
                              f"sample skipped or repeated; the sample order changes){exact}")
    if streams < W:
        raise ConfigError(f"parallel.data_streams = {streams} is smaller than the world size {W}: every rank needs "
                          f"a data stream; use at least {W} (0 = one per rank)"
                          + (" with --parallel.remap_streams=true" if saved is not None else ""))
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
            if isinstance(samples_per_pack, tuple):
                raise DataStreamError(*reversed(samples_per_pack))
        packs = math.ceil(t.global_batch_samples / samples_per_pack)
    else:
        packs = streams
    return BatchPlan(packs, streams, W, info.rank, samples_per_pack, remapped_from)


def describe_plan(plan: BatchPlan, cfg: JobConfig) -> str:
    """The effective global batch, for the start-up log."""
    P, tokens = plan.packs_per_step, plan.packs_per_step * cfg.data.pack_tokens
    asked = cfg.train.global_batch_samples
    samples = f"~{P * plan.samples_per_pack:,.0f} samples" if plan.samples_per_pack else "samples as packed"
    pad = plan.padding_share()
    return (f"global batch: {P} pack{'s' * (P != 1)} of {cfg.data.pack_tokens} tokens per step ({samples}"
            + (f", {asked:,} asked" if asked and plan.samples_per_pack else "")
            + f"; at most {tokens:,} tokens) from {plan.data_streams} data stream(s); "
            f"{plan.micro_steps(0)} micro-step(s) per rank"
            + (f", {pad:.0%} of them loss-free padding (ranks hold unequal numbers of packs)" if pad > 0 else ""))


def padding_pack(cfg: ModelConfig, tokenizer: Tokenizer) -> PackedBatch:
    """The smallest pack (one patch, one caption token): a padding micro-step runs it with loss weight 0, so a rank
    with fewer packs joins FSDP's collectives at almost no cost."""
    return pack_samples([Sample(torch.zeros(1, cfg.patch_dim), (1, 1), torch.tensor([tokenizer.eot_id]))])


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the (sharded) gradients; clipped to ``max_norm`` when it is finite and > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # sums the shards' partial norms across ranks
    if max_norm > 0 and torch.isfinite(norm):
        clip_grads_with_norm_(params, max_norm, norm)
    return norm


@dataclass
class StepStats:
    """One step, summed over all ranks (``data_wait_s``: this rank's time waiting for packs)."""

    loss: float
    grad_norm: float
    loss_tokens: int
    tokens: int
    samples: int
    flops: float
    stop_votes: int
    data_wait_s: float
    interrupted: bool = False
    """A rank's wait for a pack was cut short by a stop signal: the step was dropped (gradients zero, no stats)."""
    counts: list[float] = field(default_factory=list)
    """The caller's ``counts()``, summed over all ranks (empty when interrupted)."""


def train_step(model: nn.Module, params: list[torch.Tensor], sources: list[Iterator[PackedBatch]], micro_steps: int,
               *, pad: PackedBatch, mcfg: ModelConfig, device: torch.device, max_norm: float,
               token_multiple: int = 1, stop_requested: Callable[[], bool] = lambda: False,
               counts: Callable[[], list[float]] = list) -> StepStats:
    """Accumulate one step's gradients (see the module doc); returns the step's global stats.

    Args:
        sources: this rank's packs of the step, one iterator per pack, in order (``next()`` is called when the
            micro-step starts, not before).
        micro_steps: micro-steps to run (``>= len(sources)``; the rest run ``pad`` with weight 0).
        pad: the padding pack, on ``device``.
        token_multiple: each pack is padded to a multiple of this many tokens on ``device`` (float8 GEMMs need 16;
            see :mod:`~genlip_fast.train.float8`); the stats count the pack's own tokens.
        counts: this rank's numbers to add up over all ranks in the step's one all-reduce, asked after its packs
            were read (the trainer: per-source samples and skips); the same length on every rank.
    Gradients end up as those of the token-mean loss over the global batch, clipped to ``max_norm``.
    """
    local = [0.0] * 4  # loss tokens, tokens, samples, FLOPs
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wait = 0.0
    failure: Exception | None = None
    for i in range(micro_steps):
        batch = None
        if i < len(sources) and failure is None:
            t0 = time.perf_counter()
            try:
                batch = next(sources[i])
            except Exception as e:  # noqa: BLE001 - the ranks agree on it after the step's collectives
                failure = e
            wait += time.perf_counter() - t0
        if batch is not None:
            for k, v in enumerate((batch.num_loss_tokens, int(batch.cu_seqlens[-1]), batch.num_samples,
                                   pack_flops(mcfg, batch))):
                local[k] += v
            batch, weight = pad_tokens(batch.to(device, non_blocking=True), token_multiple), 1.0
        else:
            batch, weight = pad, 0.0
        prepare_micro_step(model, i, micro_steps)  # no reshard or reduce until the last micro-step
        loss = model(batch, loss_denominator=1.0) * weight  # the sum of the pack's token losses
        loss.backward()
        loss_sum += loss.detach()
        del batch, loss  # the pack is released here: at most the loader's prefetch queue is held
    cut_short = isinstance(failure, DataWaitInterrupted)  # this rank's wait; `interrupted` below: any rank's
    votes = [float(stop_requested() or cut_short), float(failure is not None and not cut_short), float(cut_short)]
    extra = [float(x) for x in counts()]
    totals = torch.cat([torch.tensor(local + votes + extra, dtype=torch.float64, device=device), loss_sum.reshape(1)])
    summed = all_reduce_sum(totals).tolist()
    loss_tokens, tokens, samples, flops, stop_votes, failed, interrupted = summed[:7]
    extra, loss_total = summed[7:-1], summed[-1]
    if failed:
        raise_agreed(None if cut_short else failure)
    if interrupted:
        return StepStats(math.nan, math.nan, 0, 0, 0, 0.0, int(stop_votes), wait, interrupted=True)
    scale = 1.0 / max(1.0, loss_tokens)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, scale)
    gnorm = grad_norm_and_clip(params, max_norm)
    return StepStats(loss_total * scale, gnorm.item(), int(loss_tokens), int(tokens), int(samples), flops,
                     int(stop_votes), wait, counts=extra)
