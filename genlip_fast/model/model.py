"""GenLIP: one transformer over ``[image patches | caption tokens]`` (paper §3; DESIGN.md "The model").

Shapes: T tokens in a pack, d model width, H heads of D channels, P patches, N loss rows, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.batch import PackedBatch
from ..nn import AttendFn, GatedPrefixLMAttention, LinearCrossEntropy
from .config import ModelConfig


def drop_path_per_sample(x: torch.Tensor, p: float, seq_ids: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Stochastic depth per *packed sample*: every token of a dropped sample loses the branch, the rest are scaled
    by ``1 / (1 - p)`` — the same as dropping per batch element when samples are not packed."""
    keep = (torch.rand(num_samples + 1, device=x.device) >= p).float() / (1.0 - p)  # fp32: 1/0.9 is not a bf16
    keep[-1] = 0.0  # padding tokens (seq_id -1) index the last slot
    return (x * keep[seq_ids.long()].unsqueeze(-1)).to(x.dtype)


def drop_path_per_pack(x: torch.Tensor, p: float) -> torch.Tensor:
    """Stochastic depth per *pack*: one draw for all of ``x`` (the authors' timm ``DropPath`` on ``(rows, L, d)``
    with one 16K pack per row), kept branches scaled by ``1 / (1 - p)``."""
    keep = (torch.rand((), device=x.device) >= p).float() / (1.0 - p)
    return (x * keep.reshape(1)).to(x.dtype)  # in fp32: 1 / (1 - p) rounded to bf16 biases every kept branch


def attention(cfg: ModelConfig) -> GatedPrefixLMAttention:
    """One block's gated prefix-LM attention as the config describes it."""
    return GatedPrefixLMAttention(
        cfg.dim, cfg.n_heads, n_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, gate=cfg.gate,
        qk_norm=cfg.qk_norm, bias=cfg.attn_bias, mrope_section=cfg.mrope_section,
        mrope_interleaved=cfg.mrope_interleaved, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps,
        impl=cfg.attn_backend,
    )


def norm(cfg: ModelConfig) -> nn.Module:
    return (nn.LayerNorm if cfg.norm == "layernorm" else nn.RMSNorm)(cfg.dim, eps=cfg.norm_eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=bias)  # up
        self.w2 = nn.Linear(hidden, dim, bias=bias)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm: ``x += ls1 * drop_path(o_proj(gate * Attn(norm1 x)))``; ``x += ls2 * drop_path(MLP(norm2 x))``
    (without layer scales when ``layer_scale_init`` is None)."""

    def __init__(self, cfg: ModelConfig, drop_path: float):
        super().__init__()
        ls = cfg.layer_scale_init
        self.norm1 = norm(cfg)
        self.attn = attention(cfg)
        self.ls1 = nn.Parameter(torch.full((cfg.dim,), ls)) if ls is not None else None
        self.norm2 = norm(cfg)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.ls2 = nn.Parameter(torch.full((cfg.dim,), ls)) if ls is not None else None
        self.drop_path, self.drop_path_mode = drop_path, cfg.drop_path_mode

    def _residual(self, y: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if not (self.training and self.drop_path > 0):
            return y
        if self.drop_path_mode == "pack":
            return drop_path_per_pack(y, self.drop_path)
        return drop_path_per_sample(y, self.drop_path, batch.seq_ids, batch.num_samples)

    def forward(self, x: torch.Tensor, batch: PackedBatch | None, prefix_lens: torch.Tensor | None,
                attend: AttendFn | None = None) -> torch.Tensor:
        """``attend`` replaces the packed prefix-LM attention (then ``batch`` is only read by drop path)."""
        h = self.norm1(x)
        if attend is None:
            a = self.attn(h, batch.cu_seqlens, prefix_lens, batch.position_ids, batch.max_seqlen)
        else:
            a = self.attn(h, attend=attend)
        x = x + self._residual(a if self.ls1 is None else self.ls1 * a, batch)
        m = self.mlp(self.norm2(x))
        return x + self._residual(m if self.ls2 is None else self.ls2 * m, batch)


class GenLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        text_dim = cfg.text_embed_dim or cfg.dim
        # A 16x16 stride-16 conv; applied as a linear map on patches flattened (c, y, x), which is the same thing.
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.text_embed = nn.Embedding(cfg.vocab_size, text_dim)
        self.text_in = nn.Linear(text_dim, cfg.dim) if text_dim != cfg.dim else nn.Identity()
        linear = cfg.drop_path_schedule == "linear"
        rates = [cfg.drop_path * (i / max(1, cfg.n_layers - 1) if linear else 1.0) for i in range(cfg.n_layers)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = norm(cfg)
        self.text_out = nn.Linear(cfg.dim, text_dim) if text_dim != cfg.dim else nn.Identity()
        # untied from text_embed; the loss is the sum over loss rows (forward divides)
        self.lm_head = LinearCrossEntropy(text_dim, cfg.vocab_size, reduction="sum", impl=cfg.ce_backend)
        self.reset_parameters()

    def set_backends(self, attn: str | None = None, ce: str | None = None) -> "GenLIP":
        """Switch the attention / LM-head implementations of the built model, in its config and its modules alike
        (the modules read theirs when built): a checkpoint's training choice need not fit the machine loading it."""
        if attn is not None:
            self.cfg.attn_backend = attn
            for block in self.blocks:
                block.attn.impl = attn
        if ce is not None:
            self.cfg.ce_backend = ce
            if self.lm_head is not None:  # a vision encoder drops it
                self.lm_head.impl = ce
        return self

    def reset_parameters(self) -> None:
        """The authors' init: xavier-uniform attention projections (N(0, 0.02) with ``attn_init="normal"``), zero
        biases, N(0, 0.02) elsewhere, norms at 1."""
        xavier = self.cfg.attn_init == "xavier"
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, LinearCrossEntropy, nn.Embedding, nn.Conv2d)):
                if xavier and isinstance(m, nn.Linear) and ".attn." in f".{name}.":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for b in self.blocks:
            for ls in (b.ls1, b.ls2):
                if ls is not None:
                    nn.init.constant_(ls, self.cfg.layer_scale_init)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """``(T, d)``: patch embeddings at image positions, text embeddings at text positions, 0 on padding."""
        w = self.patch_embed.weight
        x = torch.zeros(batch.num_tokens, self.cfg.dim, device=w.device, dtype=w.dtype)
        if batch.image_index.numel():
            img = F.linear(batch.patches.to(w.dtype), w.flatten(1), self.patch_embed.bias)  # (P, d)
            x = x.index_copy(0, batch.image_index, img)
        if batch.text_index.numel():
            txt = self.text_in(self.text_embed(batch.input_ids.index_select(0, batch.text_index)))
            x = x.index_copy(0, batch.text_index, txt.to(x.dtype))
        return x

    def hidden_states(self, batch: PackedBatch, *, full_attention: bool = False,
                      attend: Sequence[AttendFn] | None = None) -> torch.Tensor:
        """``(T, d)`` after the final LayerNorm. ``full_attention`` makes every sample bidirectional (encoder);
        ``attend`` (one per block) replaces the prefix-LM attention, e.g. to keep a KV cache."""
        return self.intermediates(batch, (), full_attention=full_attention, attend=attend)[0]

    def intermediates(self, batch: PackedBatch, layers: Sequence[int], *, norm: bool = False,
                      full_attention: bool = False, attend: Sequence[AttendFn] | None = None,
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates`` on a pack: ``(T, d)`` after the final LayerNorm, and the ``(T, d)``
        output of each block in ``layers`` (0 = the first block, negative counts from the end: -1 is the last block
        before the final norm), through the final norm too when ``norm``. ``layers`` are host ints, so nothing is
        read back from the device; other arguments as :meth:`hidden_states`."""
        n = len(self.blocks)
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise IndexError(f"layers {bad} out of range for {n} blocks (use 0..{n - 1} or -{n}..-1)")
        keep = {i % n for i in layers}
        x = self.embed(batch)
        prefix_lens = batch.seqlens.to(torch.int32) if full_attention else batch.prefix_lens
        kept = {}
        for i, block in enumerate(self.blocks):
            x = block(x, batch, prefix_lens, None if attend is None else attend[i])
            if i in keep:
                kept[i] = x
        return self.norm(x), [self.norm(kept[i % n]) if norm else kept[i % n] for i in layers]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``(N, d)`` final-norm hidden states -> ``(N, V)`` float32 logits (text projection, then LM head)."""
        return self.lm_head.logits(self.text_out(h)).float()

    def forward(self, batch: PackedBatch, loss_denominator: float | torch.Tensor | None = None) -> torch.Tensor:
        """Next-token loss on caption tokens: sum of token losses / ``loss_denominator`` (default: this pack's loss
        token count; the trainer passes the global count across ranks and accumulation steps)."""
        h = self.hidden_states(batch)
        rows = self.text_out(h.index_select(0, batch.loss_index))  # (N, text_dim): only rows that carry loss
        loss_sum = self.lm_head(rows, batch.targets.index_select(0, batch.loss_index))
        if loss_denominator is None:
            loss_denominator = max(1, batch.num_loss_tokens)
        return loss_sum / loss_denominator

    def logits_at(self, batch: PackedBatch, index: torch.Tensor) -> torch.Tensor:
        """``(len(index), V)`` float32 logits at the given sequence positions (for generation and evaluation)."""
        return self.logits(self.hidden_states(batch).index_select(0, index))

    @torch.no_grad()
    def encode(self, batch: PackedBatch) -> list[torch.Tensor]:
        """Vision-encoder use: image tokens only, full attention; ``(grid_h * grid_w, d)`` features per sample from
        the final LayerNorm. Text tokens in ``batch`` (if any) are ignored: only the image part is encoded."""
        from ..data.packing import pack_images

        imgs = pack_images(_split_patches(batch), [tuple(g) for g in batch.grid_hw.tolist()])
        imgs = imgs.to(batch.patches.device)
        h = self.hidden_states(imgs, full_attention=True)
        cu = imgs.cu_seqlens.tolist()
        return [h[cu[i]:cu[i + 1]] for i in range(imgs.num_samples)]

    @torch.no_grad()
    def generate(self, patches: list[torch.Tensor], grid_hw: list[tuple[int, int]], *, eot_id: int,
                 max_new_tokens: int = 32, prompt_ids: torch.Tensor | None = None) -> list[list[int]]:
        """Greedy captions for several images at once ("Let ViT Speak"): each step packs every unfinished sample
        ``[image | prompt | generated]`` and reads the logits at its last token. Recomputes the whole sequence per
        token: the oracle that ``genlip_fast.speak.generate`` (KV cache, sampling) is tested against."""
        from ..data.packing import pack_generation

        device = self.patch_embed.weight.device
        prompt = prompt_ids.tolist() if prompt_ids is not None else []
        out: list[list[int]] = [[] for _ in patches]
        live = list(range(len(patches)))
        for _ in range(max_new_tokens):
            if not live:
                break
            batch = pack_generation([patches[i] for i in live], [grid_hw[i] for i in live],
                                    [prompt + out[i] for i in live]).to(device)
            last = (batch.cu_seqlens[1:] - 1).long()
            nxt = self.logits_at(batch, last).argmax(-1).tolist()
            for i, t in zip(list(live), nxt):
                out[i].append(t)
                if t == eot_id:
                    live.remove(i)
        return out


def _split_patches(batch: PackedBatch) -> list[torch.Tensor]:
    counts = (batch.grid_hw[:, 0] * batch.grid_hw[:, 1]).tolist()
    return list(batch.patches.split(counts))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts by part: what Table 1 counts (the transformer without its gate) and everything else."""
    parts = {"blocks": 0, "gate": 0, "patch_embed": 0, "text_embed": 0, "lm_head": 0, "other": 0}
    cfg: ModelConfig = model.cfg
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("blocks."):
            if name.endswith("attn.q_proj.weight") or name.endswith("attn.q_proj.bias"):
                gate_rows = {"elementwise": cfg.n_heads * cfg.head_dim, "headwise": cfg.n_heads, "none": 0}[cfg.gate]
                g = gate_rows * (p.shape[1] if p.dim() == 2 else 1)
                parts["gate"] += g
                n -= g
            parts["blocks"] += n
        elif name.startswith("patch_embed"):
            parts["patch_embed"] += n
        elif name.startswith(("text_embed", "text_in")):
            parts["text_embed"] += n
        elif name.startswith(("lm_head", "text_out")):
            parts["lm_head"] += n
        else:
            parts["other"] += n
    parts["total"] = sum(parts.values())
    parts["vision_encoder"] = parts["blocks"] + parts["gate"] + parts["patch_embed"] + parts["other"]
    return parts


__all__ = ["AttendFn", "GenLIP", "count_parameters", "drop_path_per_pack", "drop_path_per_sample"]
