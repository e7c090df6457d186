"""The data position a checkpoint saves for each stream, in plain ints, lists and strings::

    {"version": 3, "digest": which sources, shards and seed it belongs to, "stream": s, "streams": S,
     "sampler": a ShardSampler position (one source) or a MixtureSampler position (several),
     "closed", "open": the samples the packer holds, as [shard, sample] pairs per bin, "min_len", "truncated",
     "sources": per source {"taken": samples handed out in packs, "skipped": {reason: n}, "bad_shards": [path]},
     "weights": the sources' weights}

Version 2 (before sources) is read as a one-source position. :func:`remapped_position` continues the positions of
every stream of another layout as one stream of this one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .mixture import mixture_initial_state, remap_mixture
from .sampler import initial_state, remap_states

STATE_VERSION = 3


def initial_position(*, digest: str, stream: int, streams: int, lanes_per_stream: int, seed: int, pack_tokens: int,
                     weights: Sequence[float]) -> dict:
    """The position of stream ``stream`` of ``streams`` at the start."""
    kw = dict(seed=seed, stream=stream, streams=streams, lanes_per_stream=lanes_per_stream)
    n = len(weights)
    return {"version": STATE_VERSION, "digest": digest, "stream": stream, "streams": streams,
            "sampler": initial_state(**kw) if n == 1 else mixture_initial_state(n, **kw),
            "closed": [], "open": [], "min_len": pack_tokens, "truncated": 0,
            "sources": [{"taken": 0, "skipped": {}, "bad_shards": []} for _ in range(n)], "weights": list(weights)}


def checked_position(state: dict, digest: str) -> dict:
    """``state`` in this version's format (a version-2 position is one source with its counts as the source's),
    checked to belong to the dataset ``digest`` names; ``ValueError`` saying what differs."""
    if state.get("version") == 2 and "sources" not in state:
        taken = int(state.get("delivered", {}).get("samples", 0))
        state = {**state, "version": STATE_VERSION,
                 "sources": [{"taken": taken, "skipped": state["skipped"], "bad_shards": state["bad_shards"]}]}
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"the saved data position has format version {state.get('version')!r}; this loader reads "
                         f"versions 2 and {STATE_VERSION} (streams that read several shards at once). A data position "
                         "written before that cannot be continued: start a new run from the checkpoint's weights "
                         "(checkpoint.init_from) instead")
    if state["digest"] != digest:
        raise ValueError(f"the saved data position belongs to another dataset (digest {state['digest']!r}, this "
                         f"loader has {digest!r}): the same sources, shards (paths, in order) and data.seed are "
                         "needed to continue")
    return state


def sum_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """``{reason: n}`` dicts added up."""
    out: dict[str, int] = {}
    for c in counts:
        for reason, n in c.items():
            out[reason] = out.get(reason, 0) + int(n)
    return out


def remapped_position(old: list[dict], *, stream: int, streams: int, lanes_per_stream: int, seed: int,
                      pack_tokens: int, weights: Sequence[float], digest: str) -> tuple[dict, dict]:
    """The position of stream ``stream`` of ``streams`` that continues ``old`` (the checked positions of every
    stream of another layout, in stream order), and what it carried over (``{"from_streams", "lanes", "held"}``).

    The old open shards go on from their exact positions (:func:`~genlip_fast.data.sampler.remap_states`, per
    source of a mixture, whose draws start a new generation); the samples old stream ``t``'s packer held go to new
    stream ``t % streams``, packed as they were held (an old packer's open pack is closed when two meet); the
    counters of those old streams are added up.
    """
    remap = remap_states if len(weights) == 1 else remap_mixture
    sampler = remap([st["sampler"] for st in old], stream=stream, streams=streams, lanes_per_stream=lanes_per_stream,
                    seed=seed)
    mine = [st for t, st in enumerate(old) if t % streams == stream]
    opened = [b for st in mine for b in st["open"] if b]
    closed = [b for st in mine for b in st["closed"]] + opened[:-1]
    sources = [{"taken": sum(int(st["sources"][k]["taken"]) for st in mine),
                "skipped": sum_counts(st["sources"][k]["skipped"] for st in mine),
                "bad_shards": sorted({p for st in old for p in st["sources"][k]["bad_shards"]})}
               for k in range(len(weights))]
    state = {**initial_position(digest=digest, stream=stream, streams=streams, lanes_per_stream=lanes_per_stream,
                                seed=seed, pack_tokens=pack_tokens, weights=weights),
             "sampler": sampler, "closed": closed, "open": opened[-1:],
             "min_len": min([pack_tokens] + [int(st["min_len"]) for st in mine]),
             "truncated": sum(int(st["truncated"]) for st in mine), "sources": sources}
    lanes = [sampler] if len(weights) == 1 else sampler["sources"]
    carried = {"from_streams": [t for t in range(len(old)) if t % streams == stream],
               "lanes": sum(len(x["lanes"]) - lanes_per_stream for x in lanes),
               "held": sum(len(b) for b in closed + opened[-1:])}
    return state, carried
