"""GenLIP as the vision encoder of a multimodal LLM: image tokens only, full attention, final-LayerNorm features.

    encoder = genlip_fast.load_encoder("runs/so16_stage2", dtype=torch.bfloat16, device="cuda")
    feats = encoder([pil_image, uint8_array, ...])        # list of (grid_h * grid_w, d), one per image

All images go through one packed varlen pass (the fused prefix-LM attention with every sample's prefix = its whole
length, i.e. full attention per image). Images are turned into patches and packed on the host first
(:meth:`VisionEncoder.pack`); :meth:`VisionEncoder.features` is the device part: it reads nothing back from the
device and compiles with ``torch.compile(..., fullgraph=True)``. :func:`load_encoder` (``genlip_fast.load_encoder``)
makes one from any form of a model that ``genlip_fast.checkpoint.load`` reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..data.batch import PackedBatch
from ..data.packing import pack_images
from ..model import GenLIP
from ..data.inputs import ImageTransform

TEXT_MODULES = ("text_embed", "text_in", "text_out", "lm_head")


class VisionEncoder(nn.Module):
    """The vision part of a :class:`GenLIP` (patch embedding, blocks, final LayerNorm); the text embedding and LM
    head are dropped from ``model`` unless ``drop_text=False`` (a model still used whole, e.g. the trainer's, whose
    probe reads its features through this module). ``transform`` is how images become patches (default: native
    aspect ratio, CLIP statistics).
    """

    def __init__(self, model: GenLIP, transform: ImageTransform | None = None, *, drop_text: bool = True):
        super().__init__()
        for name in TEXT_MODULES if drop_text else ():
            setattr(model, name, None)  # an image-only pack never reads them
        self.model = model
        self.transform = transform or ImageTransform(patch_size=model.cfg.patch_size)

    @property
    def dim(self) -> int:
        """Feature width d."""
        return self.model.cfg.dim

    @torch.compiler.disable
    def pack(self, images: Sequence, grid_hw: Sequence[tuple[int, int]] | None = None) -> PackedBatch:
        """Host side: images -> one packed image-only batch (on the CPU).

        ``images``: PIL images, uint8 ``(H, W, 3)`` arrays, or already-patched float tensors
        ``(grid_h * grid_w, 3 * p * p)`` with their ``grid_hw``.
        """
        if len(images) == 0:
            raise ValueError("no images to encode")
        if grid_hw is not None:
            if len(grid_hw) != len(images):
                raise ValueError(f"{len(images)} images but {len(grid_hw)} grids")
            items = [(torch.as_tensor(p), tuple(g)) for p, g in zip(images, grid_hw)]
        else:
            items = [self.transform(im) for im in images]
        return pack_images([p for p, _ in items], [g for _, g in items])

    def features(self, batch: PackedBatch) -> torch.Tensor:
        """``(P, d)`` final-LayerNorm features of a packed image-only batch already on the model's device (P = all
        images' patches, in order). No host syncs; ``torch.compile``-able with ``fullgraph=True``."""
        return self.model.hidden_states(batch)  # pack_images sets prefix = length: full attention per image

    def forward(self, images: Sequence, grid_hw: Sequence[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """Per image ``(grid_h * grid_w, d)`` features, in the weights' dtype, on the model's device."""
        batch = self.pack(images, grid_hw)
        counts = (batch.grid_hw[:, 0] * batch.grid_hw[:, 1]).tolist()  # host tensors: no device read
        device = self.model.patch_embed.weight.device
        return list(self.features(batch.to(device, non_blocking=True)).split(counts))


def load_encoder(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 image_size: int | None = None, attn_backend: str = "auto") -> VisionEncoder:
    """The vision encoder of a checkpoint (any form :func:`~genlip_fast.checkpoint.load.load_model` reads), in
    ``dtype`` on ``device``.

    ``image_size`` None keeps each image's aspect ratio (16–1024 patches, stage 2's rule); an int resizes and
    centre-crops to that square (stage 1). Call it with a list of PIL images / uint8 arrays (or patches with
    grids); it returns per-image ``(grid_h * grid_w, d)`` final-LayerNorm features.
    """
    from ..checkpoint.load import load_model  # the checkpoint readers (DCP) load only when a checkpoint is read

    model, inputs = load_model(path, need_text=False)
    model.cfg.attn_backend = attn_backend
    transform = dataclasses.replace(inputs.image, image_size=image_size)
    return VisionEncoder(model, transform).to(device=device, dtype=dtype).eval()
