"""One data stream over its sources: the order of its samples, what it counted per source, and the check that no
source goes a whole pass without a usable sample.

With one source the order is a :class:`~genlip_fast.data.sampler.ShardSampler`'s (its position is unchanged from
single-dataset runs); with several, a :class:`~genlip_fast.data.mixture.MixtureSampler`'s, and each source has its
own skip counter and its own pass check, so a source whose records are all bad is named even while the others
deliver.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from .mixture import MixtureSampler
from .reader import ShardReader, SkipCounter
from .sampler import NoUsableSampleError, PassWatch, ShardSampler


class PassTally:
    """What a stream (or one of its sources) read since its last usable sample, as counts (reasons, shard indices),
    and the check that no whole pass (:class:`~genlip_fast.data.sampler.PassWatch`) goes without one: :meth:`used`
    (per sample the caller takes) and :meth:`check` (between decode batches) raise :class:`NoUsableSampleError`,
    worded by ``describe``."""

    def __init__(self, sampler: ShardSampler, skipped: SkipCounter, reader: ShardReader,
                 describe: Callable[[PassTally], str], option: str = "data.train_shards"):
        self.watch, self.skipped, self.reader, self.describe = PassWatch(sampler), skipped, reader, describe
        self.option = option
        self.fresh = False
        self.failed: str | None = None
        self._restart()

    def _restart(self) -> None:
        self.counts, self.bad = dict(self.skipped.counts), len(self.skipped.bad_shards)
        self.shards: set[int] = set()
        self.size = 0

    def read(self, shard: int) -> None:
        """A record of ``shard`` was read (its index is loaded: counting it costs nothing)."""
        if shard not in self.shards:
            self.shards.add(shard)
            self.size += self.reader.count(shard)

    def used(self, position: dict) -> None:
        """The caller takes a sample; ``position``: the sampler's state just past it. A whole pass that ended since
        the sample taken before it (a stream whose share of an epoch had none) is raised by the next :meth:`check`,
        after what the caller made of the samples before it."""
        if self.watch.passed(position) and self.failed is None:
            self.failed = self.describe(self)
        self.watch.usable(position)
        self.fresh = True

    def check(self) -> None:
        """Between two decode batches: raise when a whole pass went by without a sample taken, or start counting
        afresh after one was."""
        if self.failed is None and not self.fresh and self.watch.passed():
            self.failed = self.describe(self)
        if self.failed is not None:
            err = NoUsableSampleError(self.failed)
            err.option = self.option
            raise err
        if self.fresh:
            self.fresh = False
            self._restart()

    def skips(self) -> dict[str, int]:
        """Skipped samples by reason since counting started afresh."""
        now = self.skipped.counts
        return {r: now[r] - self.counts.get(r, 0) for r in now if now[r] > self.counts.get(r, 0)}

    def summary(self, where: str, caption_hint: str) -> str:
        """One line on a pass over ``where`` without a usable sample: the shards, the records read, why each was
        skipped (a record read twice in the pass, as lanes that finish first go on, counts twice); a missing
        caption is explained by ``caption_hint`` (what the rule looked for)."""
        skips = self.skips()
        shards = [self.reader.shards[i] for i in sorted(self.shards)]
        reasons = []
        for reason, n in sorted(skips.items(), key=lambda kv: -kv[1]):
            detail = caption_hint if reason in ("missing caption", "empty caption") else \
                self.skipped.details.get(reason, "")
            reasons.append(f"{n} {reason}" + (f" ({detail[:120]})" if detail else ""))
        bad = self.skipped.bad_shards[self.bad:]
        if bad:
            reasons.append(f"{len(bad)} unreadable shard{'s' * (len(bad) != 1)} ({', '.join(bad[:3])}"
                           f"{' ...' if len(bad) > 3 else ''})")
        listed = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
        return (f"no usable sample in a whole pass over {where}: {len(shards)} shard{'s' * (len(shards) != 1)} "
                f"of {self.size} samples" + (f" ({listed})" if shards else "")
                + f", {sum(skips.values())} records read: " + ", ".join(reasons or ["none"]))


class SourceStream:
    """The samples of one stream, in order, over the reader's sources, from a saved sampler position.

    ``sampler`` yields ``(shard, sample)`` pairs (global shard indices; the caller may wrap it, e.g. in the reader's
    read-ahead, as long as it iterates the same sampler); ``skipped[k]`` counts source ``k``'s bad
    records and shards (the caller's counters: the stream adds to them). ``describe(k, tally)`` words the error of a
    source (``k``) that went a whole pass without a usable sample; ``options[k]`` is the config option it names.
    """

    def __init__(self, reader: ShardReader, weights: Sequence[float], position: dict, skipped: list[SkipCounter], *,
                 seed: int, epochs: int | None, describe: Callable[[int, PassTally], str], options: Sequence[str]):
        self.reader, self.skipped = reader, skipped
        self.mixture: MixtureSampler | None = None
        if len(weights) == 1:
            self.sampler = ShardSampler(len(reader.shards), functools.partial(reader.count, skipped=skipped[0]),
                                        position, seed=seed, epochs=epochs)
            subs = [self.sampler]
        else:
            self.sampler = self.mixture = MixtureSampler(reader.sizes, self._count, weights, position, seed=seed,
                                                         epochs=epochs)
            subs = self.mixture.samplers
        self.tallies = [PassTally(sub, skipped[k], reader, functools.partial(describe, k), options[k])
                        for k, sub in enumerate(subs)]

    def _count(self, shard: int) -> int:
        return self.reader.count(shard, self.skipped[self.reader.source_of(shard)])

    @property
    def current(self) -> int:
        """The source of the latest draw (the one that raised, when drawing raised)."""
        return self.mixture.current if self.mixture is not None else 0

    def read(self, shard: int) -> None:
        """A record of ``shard`` was read."""
        self.tallies[self.reader.source_of(shard)].read(shard)

    def used(self, source: int, position: dict) -> None:
        """The caller takes a sample of ``source``; ``position``: the stream's sampler state just past it."""
        sub = position if len(self.tallies) == 1 else position["sources"][source]
        self.tallies[source].used(sub)

    def passed(self) -> bool:
        """Whether some source has gone a whole pass since its last usable sample."""
        return any(t.watch.passed() for t in self.tallies)

    def check(self) -> None:
        """Between two decode batches: :meth:`PassTally.check` of every source."""
        for t in self.tallies:
            t.check()
