"""Which samples a data stream reads, in which order: shards dealt to lanes, a random draw among open shards.

::

    epoch e:  shards ──permute(seed, e)──▶ dealt to L lanes (lane l reads positions l, l + L, ...)
    lane:     one open shard at a time, its samples in an order permuted by (seed, e, shard)
    stream s: owns K = L / S lanes (l % S == s); each draw takes the next sample of a lane picked at random

So a stream reads K shards at once and mixes them (a shuffle buffer across open shards, as webdataset pipelines
do), every sample is visited once per epoch across all streams, and the position is a few integers per lane: a
lane's (epoch, shard slot, offset) and the stream's draw count (the draws come from a counter-based RNG, so the n-th
draw needs no earlier state). Nothing per sample is materialised: an epoch's order is one permutation of the shards,
a shard's order is computed when a lane opens it, and a shard's sample count is asked for only then
(``count(shard)``; the reader loads that shard's index at that moment).

With fewer shards than lanes, each shard is split into ``J = ceil(L / N)`` parts (part ``j`` takes every J-th sample
of the shard's order) so that every lane has work. Lanes move to the next epoch on their own; near an epoch's end a
stream mixes the end of one epoch with the start of the next.

Changing the number of streams (resuming on a different number of GPUs, :func:`remap_states`) hands the saved lanes
to the new streams unchanged and starts a new set of lanes at the epoch after the last one any old lane is in; the
old lanes finish their epochs and retire. Every sample is still read exactly once per epoch.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

STATE_FORMAT = "lanes/1"
_BLOCK = 4096  # random numbers drawn per RNG call


class EmptyDatasetError(ValueError):
    """No shard holds a readable sample. ``option`` is the config option of the data it concerns."""

    option = "data.train_shards"


class NoUsableSampleError(EmptyDatasetError):
    """A data stream went a whole pass (:class:`PassWatch`) without one usable sample."""


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) for w in words])


class CounterUniforms:
    """Uniform numbers in [0, 1) by their index: ``u(n)`` is the n-th of the sequence that ``words`` key, drawn in
    blocks of 4096 from a generator seeded by the key and the block number (counter-based: any draw, no earlier
    state). The draws of a stream (which lane) and of a mixture (which source) come from here."""

    def __init__(self, *words: int):
        self.words = [int(w) for w in words]
        self._block: tuple[int, np.ndarray] | None = None

    def __call__(self, n: int) -> float:
        b, i = divmod(n, _BLOCK)
        if self._block is None or self._block[0] != b:
            self._block = (b, _rng(*self.words, b).random(_BLOCK))
        return float(self._block[1][i])


def parts_per_shard(num_shards: int, lanes: int) -> int:
    """How many parts each shard is split into so that ``lanes`` lanes all get one (1 when shards are plenty)."""
    return max(1, math.ceil(lanes / max(1, num_shards)))


# a lane is a list: [L, l, epoch, slot, offset, last_epoch]; last_epoch -1 = none
_L, _ID, _EPOCH, _SLOT, _OFF, _LAST = range(6)


def initial_state(*, seed: int = 0, stream: int = 0, streams: int = 1, lanes_per_stream: int = 16) -> dict:
    """The position of stream ``stream`` of ``streams`` at the start: its ``lanes_per_stream`` lanes in epoch 0."""
    if not 0 <= stream < streams or lanes_per_stream < 1:
        raise ValueError(f"bad stream {stream} of {streams} with {lanes_per_stream} lanes each")
    L = streams * lanes_per_stream
    return {"format": STATE_FORMAT, "key": [seed, stream, streams, 0], "draws": 0,
            "lanes": [[L, l, 0, 0, 0, -1] for l in range(stream, L, streams)]}


class ShardSampler:
    """Sample order of one stream: ``next(sampler)`` is a ``(shard, sample)`` pair; ``state_dict()`` is where it
    stands (:func:`initial_state` at the start).

    Args:
        num_shards: shards in the dataset (indices into the reader's sorted shard list).
        count: ``count(shard) -> samples`` (0 for an unreadable shard); asked only when a lane opens the shard.
        state: the position to continue from (:func:`initial_state`, :meth:`state_dict` or :func:`remap_states`).
        seed: shuffle seed (shard order per epoch, sample order per shard and epoch); the same for every stream.
        epochs: stop after this many passes (None = endless).
    """

    def __init__(self, num_shards: int, count: Callable[[int], int], state: dict, *, seed: int = 0,
                 epochs: int | None = None):
        self.num_shards, self.count, self.seed, self.epochs = num_shards, count, seed, epochs
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a sampler state of format {STATE_FORMAT!r}: {state.get('format')!r}")
        self.key = [int(x) for x in state["key"]]
        self.draws = int(state["draws"])
        self.lanes = [[int(x) for x in lane] for lane in state["lanes"]]
        self._uniforms = CounterUniforms(*self.key)
        self._orders: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._nonempty = False

    def state_dict(self) -> dict:
        """The position: plain ints and lists (a few per lane)."""
        return {"format": STATE_FORMAT, "key": list(self.key), "draws": self.draws,
                "lanes": [list(lane) for lane in self.lanes]}

    @property
    def open_shards(self) -> int:
        return len(self.lanes)

    @property
    def exhausted(self) -> bool:
        """Every lane has finished its epochs: ``next()`` raises StopIteration."""
        return all(self._finished(lane) for lane in self.lanes)

    def clone(self, count: Callable[[int], int] | None = None) -> ShardSampler:
        """A sampler at this one's position that goes on by itself (``count``: its own, default this one's)."""
        return ShardSampler(self.num_shards, count or self.count, self.state_dict(), seed=self.seed,
                            epochs=self.epochs)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, int]:
        while True:
            active = [lane for lane in self.lanes if not self._finished(lane)]
            if not active:
                raise StopIteration
            lane = active[int(self._uniform() * len(active))]
            got = self._next_of(lane)
            if 0 <= lane[_LAST] < lane[_EPOCH]:  # retired after a remap: its epochs are done
                self.lanes.remove(lane)
            if got is not None:
                return got

    # -- internals ----------------------------------------------------------------------------------------------
    def _finished(self, lane: list[int]) -> bool:
        return (0 <= lane[_LAST] < lane[_EPOCH]) or (self.epochs is not None and lane[_EPOCH] >= self.epochs)

    def _uniform(self) -> float:
        """The stream's ``draws``-th uniform number in [0, 1) (counter-based: no hidden state)."""
        self.draws += 1
        return self._uniforms(self.draws - 1)

    def _epoch_order(self, epoch: int, parts: int) -> np.ndarray:
        """Virtual shards ``part * N + shard`` of an epoch, permuted (N * parts int64: small)."""
        k = (epoch, parts)
        if k not in self._orders:
            self._orders[k] = _rng(self.seed, 1, epoch).permutation(self.num_shards * parts)
            while len(self._orders) > 4:
                self._orders.popitem(last=False)
        return self._orders[k]

    def _shard_order(self, epoch: int, shard: int) -> np.ndarray:
        k = (epoch, shard)
        if k in self._perms:
            self._perms.move_to_end(k)
        else:
            self._perms[k] = _rng(self.seed, 2, epoch, shard).permutation(self.count(shard))
            while len(self._perms) > 2 * len(self.lanes) + 4:
                self._perms.popitem(last=False)
        return self._perms[k]

    def _next_of(self, lane: list[int]) -> tuple[int, int] | None:
        """Advance ``lane`` to its next sample; None when it finished its last epoch on the way."""
        epochs_crossed = 0
        while not self._finished(lane):
            L, l, e = lane[_L], lane[_ID], lane[_EPOCH]
            J = parts_per_shard(self.num_shards, L)
            order = self._epoch_order(e, J)
            v = l + lane[_SLOT] * L  # the lane's slot-th virtual shard: order[l::L][slot]
            if v >= len(order):
                lane[_EPOCH], lane[_SLOT], lane[_OFF] = e + 1, 0, 0
                epochs_crossed += 1
                if epochs_crossed >= 2 and self.epochs is None and not self._nonempty:  # endless: never spin
                    self._check_nonempty()
                continue
            part, shard = divmod(int(order[v]), self.num_shards)
            members = self._shard_order(e, shard)
            i = part + lane[_OFF] * J
            if i >= len(members):
                lane[_SLOT], lane[_OFF] = lane[_SLOT] + 1, 0
                continue
            lane[_OFF] += 1
            return shard, int(members[i])
        return None

    def _check_nonempty(self) -> None:
        """A lane walked through whole epochs without a sample: fine if others hold them, an error if none does."""
        if not any(self.count(s) > 0 for s in range(self.num_shards)):
            raise EmptyDatasetError(f"none of the {self.num_shards} shards holds a readable sample")
        self._nonempty = True


class PassWatch:
    """Tells when a stream has gone a whole pass without a usable sample.

    A whole pass: every lane of the stream (but those retiring after a remap) read all of its share of one and the
    same epoch, from the epoch's start to its end, after the last usable sample (:meth:`usable`) — so the stream
    read all its samples of that epoch and none was usable. From a stream's start that is its first epoch; from the
    middle of one, the next. What counts as usable is the caller's call (the loader: a sample its packer took). The
    watch keeps one integer per lane, whatever the data. A mixture keeps one watch per source, on that source's
    sampler (:class:`~genlip_fast.data.stream.PassTally`).
    """

    def __init__(self, sampler: ShardSampler):
        self.sampler = sampler
        self._epoch = 0
        self.usable(sampler.state_dict())

    def usable(self, position: dict) -> None:
        """A usable sample was read; ``position`` is the sampler's state just past it."""
        lanes = [lane for lane in position["lanes"] if lane[_LAST] < 0]
        # the first epoch every lane reads from its start: a lane at (slot 0, offset 0) has not begun its epoch
        self._epoch = max((lane[_EPOCH] + (0 if lane[_SLOT] == lane[_OFF] == 0 else 1) for lane in lanes),
                          default=0)

    def passed(self, position: dict | None = None) -> bool:
        """Whether every lane has gone past that epoch since the last usable sample: now, or at ``position`` (the
        state just past a sample: true means the pass ended before that sample)."""
        lanes = [lane for lane in (position["lanes"] if position else self.sampler.lanes) if lane[_LAST] < 0]
        return bool(lanes) and all(lane[_EPOCH] > self._epoch for lane in lanes)


def remap_states(old: list[dict], *, stream: int, streams: int, lanes_per_stream: int, seed: int) -> dict:
    """The state of stream ``stream`` of ``streams`` that continues the saved sampler states ``old`` (all the
    streams of another layout, in stream order).

    The old lanes keep their positions and are dealt to the new streams in turn; each finishes the epochs up to
    ``E`` (the furthest epoch any old lane has reached) and retires. A new set of ``streams * lanes_per_stream``
    lanes starts at epoch ``E + 1``. So no sample is skipped or read twice; the order of the draws (which lane gives
    the next sample) is what differs from an uninterrupted run.
    """
    lanes = sorted((list(lane) for st in old for lane in st["lanes"]), key=lambda x: (x[_L], x[_ID], x[_EPOCH]))
    last = max(x[_EPOCH] for x in lanes)  # older generations' lanes are all behind the current one's
    for x in lanes:
        if x[_LAST] < 0:
            x[_LAST] = last
    mine = [x for i, x in enumerate(lanes) if i % streams == stream]
    L = streams * lanes_per_stream
    mine += [[L, l, last + 1, 0, 0, -1] for l in range(stream, L, streams)]
    generation = max(int(st["key"][3]) for st in old) + 1
    return {"format": STATE_FORMAT, "key": [seed, stream, streams, generation], "draws": 0, "lanes": mine}


def layout_digest(shards: list[str], seed: int) -> str:
    """Identifies the dataset a position belongs to (shard paths in order, and the seed)."""
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s};".encode())
    h.update(f"seed={seed}".encode())
    return h.hexdigest()[:16]
