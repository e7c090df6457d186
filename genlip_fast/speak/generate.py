"""Captioning with a KV cache ("Let ViT Speak"): one prefill, then one token per live sample per step.

Prefill runs the packed ``[image | prompt]`` prefixes of all images at once through the model's own prefix-LM
attention (whatever ``attn_backend`` it has) and keeps each layer's rotated keys and values per sample. Each decode
step feeds one new token per unfinished sample, which attends to its own cache only; samples that stop leave the
batch. ``GenLIP.generate`` (recompute everything per token, greedy) is the oracle this is tested against.

Shapes: B live samples, H query heads and H_kv key/value heads of D channels, L cached positions, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.packing import pack_generation
from ..model import GenLIP
from ..nn import AttendFn
from ..ops import apply_mrope


@dataclass
class Sampling:
    """How the next token is chosen."""

    temperature: float = 0.0
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p (1 = all)."""
    seed: int = 0
    """Seed of the sampling generator: the same seed, inputs and batch give the same captions."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the nucleus of each row of ``probs`` ``(B, V)``: the most probable tokens until their mass reaches
    ``top_p`` (the top token always), renormalised; every other token gets probability 0."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, V)`` float logits -> ``(B,)`` int64 next tokens (greedy, or temperature + top-p sampling)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        probs = top_p_filter(probs, sampling.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class KVCache:
    """Each layer's rotated keys and values per sample, ``(B, H_kv, L, D)``, positions ``[0, lens[b])`` in use.

    ``lens`` lives on the host (a list) and on the device (a tensor): the host copy sizes each step's slice without
    reading anything back, the device copy indexes and masks.
    """

    def __init__(self, model: GenLIP, lens: Sequence[int], capacity: int, dtype: torch.dtype, device):
        cfg = model.cfg
        self.cfg, self.n_layers = cfg, len(model.blocks)
        shape = (len(lens), cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.n_layers)]
        self.lens = list(lens)
        self.lens_t = torch.tensor(self.lens, dtype=torch.int64, device=device)

    def _rotate(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return apply_mrope(x, position_ids, cfg.mrope_section, interleaved=cfg.mrope_interleaved,
                           theta=cfg.rope_theta, impl="reference" if cfg.attn_backend == "reference" else "auto")

    def prefill(self, model: GenLIP, batch, rows: torch.Tensor, cols: torch.Tensor) -> list[AttendFn]:
        """One attend function per layer for the packed prefill: the model's prefix-LM attention, and the rotated
        keys and values of token ``t`` stored at ``[rows[t], :, cols[t]]``."""

        def attend_fn(i: int) -> AttendFn:
            attn = model.blocks[i].attn

            def attend(q, k, v, gate):
                self.k[i][rows, :, cols] = self._rotate(k, batch.position_ids).to(self.k[i].dtype)
                self.v[i][rows, :, cols] = v.to(self.v[i].dtype)
                return attn.packed_attention(q, k, v, gate, batch.cu_seqlens, batch.prefix_lens, batch.position_ids,
                                             batch.max_seqlen)

            return attend

        return [attend_fn(i) for i in range(self.n_layers)]

    def decode(self, position_ids: torch.Tensor) -> list[AttendFn]:
        """One attend function per layer for a step of one token per sample (``q (B, H, D)``, ``k, v (B, H_kv,
        D)``, positions ``(3, B)``): store the token's rotated key and value at ``lens[b]``, attend to positions
        ``<= lens[b]``."""
        L = max(self.lens) + 1
        mask = (torch.arange(L, device=self.lens_t.device) <= self.lens_t[:, None])[:, None, None, :]  # (B,1,1,L)
        batch_idx = torch.arange(len(self.lens), device=self.lens_t.device)
        gqa = self.cfg.num_kv_heads != self.cfg.n_heads

        def attend_fn(i: int) -> AttendFn:
            def attend(q, k, v, gate):
                self.k[i][batch_idx, :, self.lens_t] = self._rotate(k, position_ids).to(self.k[i].dtype)
                self.v[i][batch_idx, :, self.lens_t] = v.to(self.v[i].dtype)
                q = self._rotate(q, position_ids)[:, :, None, :]  # (B, H, 1, D)
                o = F.scaled_dot_product_attention(q, self.k[i][:, :, :L], self.v[i][:, :, :L], attn_mask=mask,
                                                   enable_gqa=gqa)
                o = o[:, :, 0].float()  # (B, H, D)
                if gate is not None:
                    g = gate.float()
                    o = o * torch.sigmoid(g if g.dim() == 3 else g[..., None])
                return o.to(q.dtype)

            return attend

        return [attend_fn(i) for i in range(self.n_layers)]

    def advance(self) -> None:
        """Every live sample has one more cached position."""
        self.lens = [n + 1 for n in self.lens]
        self.lens_t += 1

    def keep(self, index: list[int]) -> None:
        """Only the samples at ``index`` stay (finished ones leave the batch)."""
        idx = torch.tensor(index, dtype=torch.int64, device=self.lens_t.device)
        self.k = [k.index_select(0, idx) for k in self.k]
        self.v = [v.index_select(0, idx) for v in self.v]
        self.lens = [self.lens[j] for j in index]
        self.lens_t = self.lens_t.index_select(0, idx)


@torch.no_grad()
def generate(
    model: GenLIP,
    patches: Sequence[torch.Tensor],
    grid_hw: Sequence[tuple[int, int]],
    *,
    stop_ids: Collection[int],
    prompt_ids: Sequence[int] | None = None,
    max_new_tokens: int = 32,
    sampling: Sampling | None = None,
    return_logits: bool = False,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """Captions for several images at once.

    Args:
        patches: per image ``(grid_h * grid_w, C * p * p)`` float patches (as the data pipeline makes them).
        grid_hw: per image ``(grid_h, grid_w)``.
        stop_ids: token ids that end a caption (kept as its last token), e.g. ``{tokenizer.eot_id}``.
        prompt_ids: optional tokens after the image (the same for every image), e.g. "Describe the image in detail."
        sampling: greedy by default; temperature / top-p / seed otherwise.
        return_logits: also return each caption's ``(len(caption), V)`` float32 logits, one row per step.
        agree: called with each step's chosen tokens ``(B,)`` int64; returns the tokens every caller continues with.
            Ranks of a sharded model pass one that broadcasts rank 0's, so they stop the same samples at the same
            step and run the same forwards (FSDP gathers each block's weights in every one).

    Returns ``list[list[int]]`` (one caption per image, in input order), or ``(captions, logits)``.
    """
    sampling = sampling or Sampling()
    device = model.patch_embed.weight.device
    n = len(patches)
    prompt = [] if prompt_ids is None else [int(t) for t in prompt_ids]
    out: list[list[int]] = [[] for _ in range(n)]
    logits_out: list[list[torch.Tensor]] = [[] for _ in range(n)]
    if n == 0 or max_new_tokens <= 0:
        return (out, [torch.zeros(0, model.cfg.vocab_size) for _ in out]) if return_logits else out
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.temperature > 0 else None
    stop = set(stop_ids)

    batch = pack_generation(patches, grid_hw, [prompt] * n)
    lens = batch.seqlens.tolist()  # host: the batch is still on the CPU here
    rows = batch.seq_ids[: batch.cu_seqlens[-1]].long()
    cols = torch.arange(len(rows)) - batch.cu_seqlens[:-1].long().repeat_interleave(batch.seqlens.long())
    last = (batch.cu_seqlens[1:] - 1).long()
    # text position of the first generated token: the image's max(grid_h, grid_w), then the prompt
    next_pos = [max(h, w) + len(prompt) for h, w in grid_hw]
    batch = batch.to(device)
    dtype = model.patch_embed.weight.dtype
    cache = KVCache(model, lens, max(lens) + max_new_tokens, dtype, device)
    h = model.hidden_states(batch, attend=cache.prefill(model, batch, rows.to(device), cols.to(device)))
    logits = model.logits(h.index_select(0, last.to(device)))  # (B, V)

    live = list(range(n))
    for step in range(max_new_tokens):
        tokens = sample_next(logits, sampling, generator)
        if agree is not None:
            tokens = agree(tokens)
        still, keep = [], []
        for j, (i, t) in enumerate(zip(live, tokens.tolist())):
            out[i].append(t)
            if return_logits:
                logits_out[i].append(logits[j].cpu())
            if t not in stop and step + 1 < max_new_tokens:
                still.append(i)
                keep.append(j)
        if not still:
            break
        if len(keep) < len(live):
            cache.keep(keep)
            tokens = tokens[torch.tensor(keep, device=tokens.device)]
            next_pos = [next_pos[j] for j in keep]
        live = still
        pos = torch.tensor(next_pos, dtype=torch.int64).expand(3, -1).to(device)  # text: (p, p, p)
        x = model.text_in(model.text_embed(tokens))  # (B, d)
        for block, attend in zip(model.blocks, cache.decode(pos)):
            x = block(x, None, None, attend)
        logits = model.logits(model.norm(x))
        cache.advance()
        next_pos = [p + 1 for p in next_pos]
    if return_logits:
        return out, [torch.stack(rows_) for rows_ in logits_out]
    return out
