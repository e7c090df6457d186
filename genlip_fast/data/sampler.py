"""Which samples a rank reads, in which order: reproducible from a seed, split by rank and reader, restartable.

An epoch visits every sample of every shard once across all ranks. The shards are shuffled per epoch and dealt to
the ``world_size * num_workers`` readers (reader ``rank * num_workers + w``); when there are fewer shards than
readers, every shard is dealt sample by sample instead. Each reader visits its samples in an order shuffled per
(epoch, shard). A rank's stream interleaves its readers round by round (one sample from each reader that still has
some), so position ``j`` of an epoch names one sample whatever was read before it: a cursor ``(epoch, j)`` is a
complete description of where a rank stands.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) for w in words])


class ShardSampler:
    """Sample order for one rank: ``items(epoch)`` is an ``(N, 2)`` int64 array of (shard index, sample index)."""

    def __init__(self, counts: list[int], *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 1):
        if not 0 <= rank < world_size or num_workers < 1:
            raise ValueError(f"bad rank {rank} of {world_size} with {num_workers} readers")
        self.counts = [int(c) for c in counts]
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def num_readers(self) -> int:
        return self.world_size * self.num_workers

    def reader_items(self, epoch: int, reader: int) -> np.ndarray:
        """``(K, 2)`` (shard, sample) pairs reader ``reader`` (global index) visits in ``epoch``, in order."""
        P = self.num_readers
        order = _rng(self.seed, epoch).permutation(len(self.counts))
        parts = []
        if len(self.counts) >= P:
            for s in order[reader::P]:
                idx = _rng(self.seed, epoch, 1 + s).permutation(self.counts[s])
                parts.append(np.stack([np.full_like(idx, s), idx], 1))
        else:
            for s in order:
                idx = _rng(self.seed, epoch, 1 + s).permutation(self.counts[s])[reader::P]
                parts.append(np.stack([np.full_like(idx, s), idx], 1))
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 2), np.int64)

    def items(self, epoch: int) -> np.ndarray:
        """``(N, 2)`` this rank's stream for ``epoch``: its readers interleaved round by round."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        per = [self.reader_items(epoch, self.rank * self.num_workers + w) for w in range(self.num_workers)]
        rounds = np.concatenate([np.arange(len(p)) for p in per]) if per else np.zeros(0, np.int64)
        workers = np.concatenate([np.full(len(p), w) for w, p in enumerate(per)])
        order = np.lexsort((workers, rounds))  # round first, then reader
        out = np.concatenate(per)[order] if len(order) else np.zeros((0, 2), np.int64)
        self._cache = (epoch, out)
        return out

    def digest(self, shards: list[str]) -> str:
        """Identifies the dataset layout a cursor belongs to (shard names and sizes, seed, split)."""
        h = hashlib.sha256()
        for s, c in zip(shards, self.counts):
            h.update(f"{s}:{c};".encode())
        h.update(f"{self.seed}:{self.world_size}:{self.num_workers}".encode())
        return h.hexdigest()[:16]
