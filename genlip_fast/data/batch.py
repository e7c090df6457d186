"""The packed batch every stage reads, and the samples it is made of."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One image–caption pair, ready to pack.

    The sequence it becomes is ``[image patches | prompt | caption]``; the caption ends with the end-of-text token.
    """

    patches: torch.Tensor
    """``(grid_h * grid_w, C * p * p)`` float, row-major over the grid; each row flattened as (c, y, x)."""
    grid_hw: tuple[int, int]
    """Patch grid (rows, cols); (0, 0) for a text-only sample."""
    caption_ids: torch.Tensor
    """``(L,)`` int64 caption tokens, ending with end-of-text; these carry the loss."""
    prompt_ids: torch.Tensor | None = None
    """Optional ``(L_p,)`` int64 tokens between image and caption; they carry no loss."""
    key: str = ""
    """Where the sample came from (shard/key), for error messages."""

    def __post_init__(self):
        h, w = (int(x) for x in self.grid_hw)
        self.grid_hw = (h, w)
        if self.patches.dim() != 2 or self.patches.shape[0] != h * w:
            raise ValueError(
                f"sample {self.key!r}: patches {tuple(self.patches.shape)} do not match grid {h}x{w} "
                f"(expected ({h * w}, patch_dim))"
            )
        if self.caption_ids.dim() != 1:
            raise ValueError(f"sample {self.key!r}: caption_ids must be 1-D, got {tuple(self.caption_ids.shape)}")
        if self.prompt_ids is None:
            self.prompt_ids = torch.zeros(0, dtype=torch.int64)

    @property
    def num_patches(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def num_text(self) -> int:
        return int(self.prompt_ids.numel() + self.caption_ids.numel())

    def __len__(self) -> int:
        return self.num_patches + self.num_text


@dataclass
class PackedBatch:
    """Whole samples laid end to end in one flat sequence of ``T`` tokens (the last ones may be padding).

    Index tensors (``image_index``, ``text_index``, ``loss_index``) are built on the host by the packer so the model
    gathers and scatters rows without reading anything back from the device.
    """

    cu_seqlens: torch.Tensor
    """``(n + 1,)`` int32 sample boundaries; ``cu_seqlens[-1]`` = tokens in use (``<= T``)."""
    prefix_lens: torch.Tensor
    """``(n,)`` int32 image tokens at the start of each sample."""
    position_ids: torch.Tensor
    """``(3, T)`` int64 MRoPE positions (t, h, w); 0 on padding."""
    patches: torch.Tensor
    """``(P, C * p * p)`` float image patches of all samples, in sequence order."""
    image_index: torch.Tensor
    """``(P,)`` int64 sequence positions of the patches."""
    input_ids: torch.Tensor
    """``(T,)`` int64 text token ids at text positions, 0 elsewhere."""
    text_index: torch.Tensor
    """``(N_text,)`` int64 sequence positions of the text tokens (prompt and caption)."""
    targets: torch.Tensor
    """``(T,)`` int64 next-token targets: the following caption token, ``-100`` where there is none."""
    loss_index: torch.Tensor
    """``(N_loss,)`` int64 positions whose target is a caption token."""
    seq_ids: torch.Tensor
    """``(T,)`` int32 sample index of each token, -1 on padding."""
    grid_hw: torch.Tensor
    """``(n, 2)`` int64 patch grid per sample."""
    max_seqlen: int
    """Longest sample (host int), for kernel grids."""
    keys: list[str] = dataclasses.field(default_factory=list)
    """Sample keys, for logs."""

    @property
    def num_samples(self) -> int:
        return self.prefix_lens.numel()

    @property
    def num_tokens(self) -> int:
        """Sequence length T including padding."""
        return self.input_ids.numel()

    @property
    def num_loss_tokens(self) -> int:
        return self.loss_index.numel()

    @property
    def seqlens(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """Copy every tensor to ``device``; host ints and keys stay."""
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return PackedBatch(**moved)

    def pin_memory(self) -> "PackedBatch":
        """The same batch with its host tensors in pinned memory (tensors already on a GPU stay)."""
        return PackedBatch(**{
            f.name: (v.pin_memory() if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v)
            for f in dataclasses.fields(self) for v in [getattr(self, f.name)]
        })
