"""Packing whole samples into flat sequences of at most ``max_tokens`` tokens (16,384 by default).

A sample is never split across packs: one longer than a pack is an error, or — with ``truncate=True`` — has its
caption cut to fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import torch

from .batch import IGNORE_INDEX, PackedBatch, Sample

DEFAULT_PACK_TOKENS = 16384


class SampleTooLongError(ValueError):
    pass


def fit_sample(sample: Sample, max_tokens: int, truncate: bool = False) -> Sample:
    """Return ``sample`` if it fits in a pack; else raise, or cut its caption when ``truncate``."""
    if len(sample) <= max_tokens:
        return sample
    room = max_tokens - sample.num_patches - sample.prompt_ids.numel()
    if not truncate or room < 1:
        what = "even its image and prompt do not fit" if room < 1 else "pass truncate=True to cut its caption"
        raise SampleTooLongError(
            f"sample {sample.key!r} has {len(sample)} tokens ({sample.num_patches} patches + {sample.num_text} text) "
            f"but a pack holds {max_tokens}; samples are never split across packs ({what})"
        )
    return Sample(sample.patches, sample.grid_hw, sample.caption_ids[:room], sample.prompt_ids, sample.key)


def pack_samples(samples: Sequence[Sample], *, max_tokens: int | None = DEFAULT_PACK_TOKENS,
                 pad_to: int | None = None, require_caption: bool = True) -> PackedBatch:
    """Lay ``samples`` end to end into one :class:`PackedBatch`, optionally padded to ``pad_to`` tokens.

    Training samples need a caption (at least the end-of-text token); ``require_caption=False`` is for encoding
    and generation, where the text is absent or still being written.
    """
    if len(samples) == 0:
        raise ValueError("cannot pack 0 samples: a pack holds at least one sample")
    if require_caption:
        for s in samples:
            if s.caption_ids.numel() == 0:
                raise ValueError(
                    f"sample {s.key!r}: the caption has 0 tokens; every caption needs at least the end-of-text token"
                )
    P = [s.num_patches for s in samples]
    Lp = [s.prompt_ids.numel() for s in samples]
    Lc = [s.caption_ids.numel() for s in samples]
    lens = [p + a + b for p, a, b in zip(P, Lp, Lc)]
    total = sum(lens)
    limit = pad_to if pad_to is not None else max_tokens
    if limit is not None and total > limit:
        for s in samples:
            fit_sample(s, limit)  # names the sample when one alone is too long
        raise SampleTooLongError(f"{len(samples)} samples hold {total} tokens, more than the pack's {limit}")
    T = pad_to if pad_to is not None else total
    patch_dim = next((s.patches.shape[1] for s in samples if s.num_patches), None)
    for s in samples:
        if s.num_patches and s.patches.shape[1] != patch_dim:
            raise ValueError(f"sample {s.key!r} has patch_dim {s.patches.shape[1]}, the pack has {patch_dim}")

    # Whole-pack tensor ops (a few dozen per pack, whatever its number of samples): the per-token sample id and
    # position within the sample decide everything else.
    n = len(samples)
    grid = torch.tensor([s.grid_hw for s in samples], dtype=torch.int64).reshape(n, 2)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    cu = torch.zeros(n + 1, dtype=torch.int64)
    cu[1:] = lens_t.cumsum(0)
    seq = torch.repeat_interleave(torch.arange(n), lens_t)  # (total,) sample of each token
    local = torch.arange(total) - cu[seq]  # position within its sample
    P_t = torch.tensor(P, dtype=torch.int64)
    is_img = local < P_t[seq]
    # MRoPE: image token k of an (h, w) grid -> (0, k // w, k % w); text token j -> max(h, w) + j on all three
    text_pos = grid.max(1).values[seq] + (local - P_t[seq])
    gw = grid[:, 1].clamp(min=1)[seq]
    position_ids = torch.zeros(3, T, dtype=torch.int64)
    position_ids[0, :total] = torch.where(is_img, 0, text_pos)
    position_ids[1, :total] = torch.where(is_img, local // gw, text_pos)
    position_ids[2, :total] = torch.where(is_img, local % gw, text_pos)
    image_index = is_img.nonzero().flatten()
    text_index = (~is_img).nonzero().flatten()
    input_ids = torch.zeros(T, dtype=torch.int64)
    input_ids[text_index] = torch.cat([t for s in samples for t in (s.prompt_ids, s.caption_ids)])
    # caption token j of a sample is the target of the token before it, when that token is in the same sample
    cap_pos = (local >= (P_t + torch.tensor(Lp, dtype=torch.int64))[seq]).nonzero().flatten()
    keep = local[cap_pos] > 0
    targets = torch.full((T,), IGNORE_INDEX, dtype=torch.int64)
    targets[cap_pos[keep] - 1] = torch.cat([s.caption_ids for s in samples])[keep]
    seq_ids = torch.full((T,), -1, dtype=torch.int32)
    seq_ids[:total] = seq.to(torch.int32)
    return PackedBatch(
        cu_seqlens=cu.to(torch.int32),
        prefix_lens=P_t.to(torch.int32),
        position_ids=position_ids,
        patches=torch.cat([s.patches for s in samples]) if patch_dim is not None else torch.zeros(0, 0),
        image_index=image_index,
        input_ids=input_ids,
        text_index=text_index,
        targets=targets,
        loss_index=(targets != IGNORE_INDEX).nonzero().flatten(),
        seq_ids=seq_ids,
        grid_hw=grid,
        max_seqlen=max(lens),
        keys=[s.key for s in samples],
    )


def pack_images(patches: Sequence[torch.Tensor], grid_hw: Sequence[tuple[int, int]]) -> PackedBatch:
    """Image-only samples (vision-encoder use): no text, no loss."""
    empty = torch.zeros(0, dtype=torch.int64)
    return pack_samples([Sample(p, g, empty) for p, g in zip(patches, grid_hw)], max_tokens=None,
                        require_caption=False)


def pack_generation(patches: Sequence[torch.Tensor], grid_hw: Sequence[tuple[int, int]],
                    text: Sequence[Sequence[int]]) -> PackedBatch:
    """Samples ``[image | text so far]`` for greedy decoding; the text goes in as prompt (no loss)."""
    empty = torch.zeros(0, dtype=torch.int64)
    samples = [Sample(p, g, empty, prompt_ids=torch.tensor(list(t), dtype=torch.int64))
               for p, g, t in zip(patches, grid_hw, text)]
    return pack_samples(samples, max_tokens=None, require_caption=False)


def pad_tokens(batch: PackedBatch, multiple: int) -> PackedBatch:
    """``batch`` with padding tokens appended (position 0, input id 0, no target, ``seq_ids`` -1, as
    ``pack_samples(pad_to=...)`` writes them) until ``T`` is a multiple of ``multiple``; ``batch`` itself when it is
    one already. On any device; the samples, their patches and index tensors are unchanged."""
    extra = -batch.num_tokens % multiple
    if extra == 0:
        return batch

    def grow(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t, t.new_full((*t.shape[:-1], extra), value)], dim=-1)

    return dataclasses.replace(batch, position_ids=grow(batch.position_ids, 0), input_ids=grow(batch.input_ids, 0),
                               targets=grow(batch.targets, IGNORE_INDEX), seq_ids=grow(batch.seq_ids, -1))


def _tightest_bin_py(used: Sequence[int], n: int, capacity: int) -> int:
    """Index of the open pack (tokens ``used`` each) with the least room that still fits ``n``, or -1."""
    best, best_room = -1, capacity + 1
    for i, u in enumerate(used):
        if n <= capacity - u < best_room:
            best, best_room = i, capacity - u
    return best


try:  # the optional compiled helper (csrc/packing.cpp); same answer, fewer Python comparisons
    from .._csrc import tightest_bin  # type: ignore[attr-defined]
except ImportError:
    tightest_bin = _tightest_bin_py


class Packer:
    """Streams samples into packs.

    ``lookahead == 1``: greedy — a pack is closed when the next sample does not fit (good for stage 1, where
    samples are alike). ``lookahead > 1``: samples wait in up to that many open packs and each goes to the one it fills
    most tightly (best fit); the fullest pack is closed when ``lookahead`` samples are buffered, and any pack is closed
    as soon as its room is smaller than the shortest sample seen so far (nothing could fill it). Order within a pack
    follows arrival. ``fill_ratio`` reports tokens used over tokens offered by emitted packs.

    ``add`` is ``place`` followed by ``ready``; a streaming loader uses the two halves to record, between packs,
    which samples are still buffered (``buffered()``) and to rebuild that state later (``restore()``).
    """

    def __init__(self, max_tokens: int = DEFAULT_PACK_TOKENS, *, lookahead: int = 1, pad_to: int | None = None,
                 truncate: bool = False):
        self.max_tokens, self.lookahead, self.pad_to, self.truncate = max_tokens, max(1, lookahead), pad_to, truncate
        self._bins: list[list[Sample]] = []
        self._bin_tokens: list[int] = []
        self._closed: list[list[Sample]] = []
        self._min_len = max_tokens
        self._used_tokens = 0
        self._packs = 0

    @property
    def fill_ratio(self) -> float:
        return self._used_tokens / max(1, self._packs * self.max_tokens)

    def _emit(self, samples: list[Sample]) -> PackedBatch:
        self._used_tokens += sum(len(s) for s in samples)
        self._packs += 1
        return pack_samples(samples, max_tokens=self.max_tokens, pad_to=self.pad_to)

    def _close(self, i: int) -> None:
        self._closed.append(self._bins.pop(i))
        self._bin_tokens.pop(i)

    def place(self, sample: Sample) -> Sample:
        """Put one sample into an open pack (closing packs as the policy says); returns it as placed (its caption
        may have been cut when ``truncate``). Closed packs wait for :meth:`ready`."""
        sample = fit_sample(sample, self.max_tokens, self.truncate)
        n = len(sample)
        self._min_len = min(self._min_len, n)
        if self.lookahead == 1:
            if self._bins and self._bin_tokens[0] + n > self.max_tokens:
                self._close(0)
            if not self._bins:
                self._bins.append([])
                self._bin_tokens.append(0)
            self._bins[0].append(sample)
            self._bin_tokens[0] += n
            return sample
        best = tightest_bin(self._bin_tokens, n, self.max_tokens)
        if best < 0:
            self._bins.append([])
            self._bin_tokens.append(0)
        self._bins[best].append(sample)
        self._bin_tokens[best] += n
        if self.max_tokens - self._bin_tokens[best] < self._min_len:
            self._close(best % len(self._bins))
        while sum(len(b) for b in self._bins) >= self.lookahead or len(self._bins) > self.lookahead:
            self._close(max(range(len(self._bins)), key=self._bin_tokens.__getitem__))
        return sample

    def ready(self) -> Iterator[PackedBatch]:
        """Emit the closed packs, oldest first; between two, :meth:`buffered` shows what is still held."""
        while self._closed:
            yield self._emit(self._closed.pop(0))

    def add(self, sample: Sample) -> list[PackedBatch]:
        """Add one sample; return the packs that are now complete (possibly none)."""
        self.place(sample)
        return list(self.ready())

    def buffered(self) -> tuple[list[list[Sample]], list[list[Sample]]]:
        """``(closed, open)``: samples held, pack by pack, in the order they will leave."""
        return [list(b) for b in self._closed], [list(b) for b in self._bins]

    @property
    def min_len(self) -> int:
        """Shortest sample seen (a pack with less room than this is closed); saved with :meth:`buffered`'s state."""
        return self._min_len

    def restore(self, closed: list[list[Sample]], open_bins: list[list[Sample]], min_len: int | None = None) -> None:
        """Rebuild the state :meth:`buffered` and :attr:`min_len` described (same samples, same packs, same order)."""
        self._closed = [list(b) for b in closed]
        self._bins = [list(b) for b in open_bins]
        self._bin_tokens = [sum(len(s) for s in b) for b in self._bins]
        lens = [len(s) for b in self._closed + self._bins for s in b]
        self._min_len = min(lens, default=self.max_tokens) if min_len is None else int(min_len)

    def close_all(self) -> None:
        """Close every open pack (end of stream); :meth:`ready` then emits them."""
        self._closed += [b for b in self._bins if b]
        self._bins, self._bin_tokens = [], []

    def flush(self) -> list[PackedBatch]:
        """Emit whatever is buffered (end of stream)."""
        self.close_all()
        return list(self.ready())

    def pack(self, samples: Iterable[Sample]) -> Iterator[PackedBatch]:
        for s in samples:
            yield from self.add(s)
        yield from self.flush()
