"""Several sources in one stream, drawn by weight: which source each sample of a stream comes from.

::

    draw n of stream s:  u = uniform(seed, s, streams, generation, n)       (counter-based: no hidden state)
                         source k = the one whose share of the weights holds u (among sources not yet done)
                         the sample = next(source k's ShardSampler)           (its own lanes, shards and epochs)

Each source is a :class:`~genlip_fast.data.sampler.ShardSampler` over its own shards (its own shuffle seed), so it
keeps every property of one dataset: each of its samples once per epoch across the streams, its open shards mixed.
A source's epochs run on their own: a small source with a large weight is read many times while a large one is read
once. The position is the draw count and each source's sampler position — a few integers — so a stream continues
exactly. Shard indices are global: source ``k``'s shards follow those of the sources before it.

Changing the number of streams (:func:`remap_mixture`) remaps each source's positions as one dataset's are and
starts a new generation of draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .sampler import CounterUniforms, ShardSampler, initial_state, remap_states

MIXTURE_FORMAT = "mixture/1"


def source_seed(seed: int, k: int) -> int:
    """The shuffle seed of source ``k``: sources of one run shuffle independently."""
    return int(np.random.SeedSequence([int(seed), 7, int(k)]).generate_state(1)[0])


def mixture_initial_state(num_sources: int, *, seed: int = 0, stream: int = 0, streams: int = 1,
                          lanes_per_stream: int = 16) -> dict:
    """The position of stream ``stream`` of ``streams`` at the start: no draw yet, every source at its start."""
    return {"format": MIXTURE_FORMAT, "key": [seed, stream, streams, 0], "draws": 0,
            "sources": [initial_state(seed=source_seed(seed, k), stream=stream, streams=streams,
                                      lanes_per_stream=lanes_per_stream) for k in range(num_sources)]}


class MixtureSampler:
    """The sample order of one stream over several sources: ``next()`` is a ``(global shard, sample)`` pair and
    :attr:`current` the source it came from (or the source whose sampler raised); ``state_dict()`` is where it
    stands.

    Args:
        sizes: shards per source, in source order (source ``k``'s shard ``i`` is global shard ``start_k + i``).
        count: ``count(global shard) -> samples`` (0 for an unreadable shard), asked when a lane opens the shard.
        weights: each source's weight (> 0); the shares are weight / sum of the weights of the sources not done.
        state: :func:`mixture_initial_state`, :meth:`state_dict` or :func:`remap_mixture`.
        epochs: each source stops after this many passes (None = endless); the stream ends when all have.
    """

    def __init__(self, sizes: Sequence[int], count: Callable[[int], int], weights: Sequence[float], state: dict, *,
                 seed: int = 0, epochs: int | None = None):
        if state.get("format") != MIXTURE_FORMAT or len(state["sources"]) != len(sizes):
            raise ValueError(f"not a {MIXTURE_FORMAT!r} position of {len(sizes)} sources: "
                             f"{state.get('format')!r} with {len(state.get('sources', []))}")
        if len(weights) != len(sizes) or not all(w > 0 for w in weights):
            raise ValueError(f"need one weight > 0 per source, got {list(weights)} for {len(sizes)} sources")
        self.sizes, self.count, self.seed = list(sizes), count, seed
        self.starts = [int(x) for x in np.cumsum([0, *sizes[:-1]])]
        self.weights = [float(w) for w in weights]
        self.epochs = epochs
        self.samplers = [ShardSampler(n, lambda i, a=a: count(a + i), st, seed=source_seed(seed, k), epochs=epochs)
                         for k, (n, a, st) in enumerate(zip(sizes, self.starts, state["sources"]))]
        self.key = [int(x) for x in state["key"]]
        self.draws = int(state["draws"])
        self.done = [s.exhausted for s in self.samplers]  # as the draws that found them finished left them
        self.current = -1
        self._uniforms = CounterUniforms(*self.key, 7)  # 7: a sequence of its own, apart from the lanes' draws

    def state_dict(self) -> dict:
        return {"format": MIXTURE_FORMAT, "key": list(self.key), "draws": self.draws,
                "sources": [s.state_dict() for s in self.samplers]}

    @property
    def open_shards(self) -> int:
        return sum(s.open_shards for s in self.samplers)

    def clone(self, count: Callable[[int], int] | None = None) -> MixtureSampler:
        """A sampler at this one's position that goes on by itself (``count``: its own, default this one's)."""
        return MixtureSampler(self.sizes, count or self.count, self.weights, self.state_dict(), seed=self.seed,
                              epochs=self.epochs)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, int]:
        while not all(self.done):
            k = self.current = self.pick(self._uniforms(self.draws))
            self.draws += 1
            try:
                shard, i = next(self.samplers[k])
            except StopIteration:  # this source finished its epochs; the others go on
                self.done[k] = True
                continue
            return self.starts[k] + shard, i
        raise StopIteration

    def pick(self, u: float) -> int:
        """The source that ``u`` in [0, 1) falls to, by weight among the sources not done."""
        live = [k for k, d in enumerate(self.done) if not d]
        total = sum(self.weights[k] for k in live)
        acc = 0.0
        for k in live:
            acc += self.weights[k] / total
            if u < acc:
                return k
        return live[-1]  # u within rounding of 1



def remap_mixture(old: list[dict], *, stream: int, streams: int, lanes_per_stream: int, seed: int) -> dict:
    """The mixture position of stream ``stream`` of ``streams`` continuing the saved positions ``old`` (all the
    streams of another layout, in stream order): each source's positions are remapped as one dataset's
    (:func:`~genlip_fast.data.sampler.remap_states`), and the draws start a new generation."""
    n = len(old[0]["sources"])
    sources = [remap_states([st["sources"][k] for st in old], stream=stream, streams=streams,
                            lanes_per_stream=lanes_per_stream, seed=source_seed(seed, k)) for k in range(n)]
    generation = max(int(st["key"][3]) for st in old) + 1
    return {"format": MIXTURE_FORMAT, "key": [seed, stream, streams, generation], "draws": 0, "sources": sources}
