"""GenLIP as the vision encoder of a multimodal LLM: image tokens only, full attention, final-LayerNorm features.

    encoder = genlip_fast.load_encoder("runs/so16_stage2", dtype=torch.bfloat16, device="cuda")
    feats = encoder([pil_image, uint8_array, ...])        # list of (grid_h * grid_w, d), one per image
    out = encoder.encode(images, layers=[-2], norm=False)  # out.patches[i] (1, L_i, d); out.pooled (1, n, d)

All images go through one packed varlen pass (the fused prefix-LM attention with every sample's prefix = its whole
length, i.e. full attention per image). Images are turned into patches and packed on the host first
(:meth:`VisionEncoder.pack`); :meth:`VisionEncoder.features` is the device part: it reads nothing back from the
device and compiles with ``torch.compile(..., fullgraph=True)``, with ``layers`` (other blocks' outputs, timm's
``forward_intermediates`` indices) too, and so does :meth:`VisionEncoder.pool`. :func:`load_encoder`
(``genlip_fast.load_encoder``) makes one from any form of a model that ``genlip_fast.checkpoint.load`` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.batch import PackedBatch
from ..data.inputs import ImageTransform
from ..data.packing import pack_images
from ..model import GenLIP

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

    def features(self, batch: PackedBatch, layers: Sequence[int] | None = None, norm: bool = False) -> torch.Tensor:
        """``(P, d)`` final-LayerNorm features of a packed image-only batch already on the model's device (P = all
        images' patches, in order). With ``layers`` (timm's ``forward_intermediates`` indices: 0 is the first
        block, -1 the last, before the final norm): ``(len(layers), P, d)``, those blocks' outputs, each through the
        final norm when ``norm``. No host syncs; ``torch.compile``-able with ``fullgraph=True``."""
        if layers is not None and len(layers) == 0:
            raise ValueError("layers is empty: name at least one block (0..n-1, or -1 for the last), or pass None "
                             "for the final-LayerNorm features")
        if layers is None:
            return self.model.hidden_states(batch)  # pack_images sets prefix = length: full attention per image
        return torch.stack(self.model.intermediates(batch, layers, norm=norm)[1])

    def pool(self, batch: PackedBatch, feats: torch.Tensor) -> torch.Tensor:
        """The mean over each image's patches of :meth:`features`' output: ``(..., P, d)`` -> ``(..., n, d)``,
        summed in float32, in ``feats``' dtype. No host syncs."""
        sums = feats.new_zeros((*feats.shape[:-2], batch.num_samples, feats.shape[-1]), dtype=torch.float32)
        sums.index_add_(feats.dim() - 2, batch.seq_ids.long(), feats.float())  # image-only packs have no padding
        return (sums / batch.seqlens.to(torch.float32)[:, None]).to(feats.dtype)

    def encode(self, images: Sequence, grid_hw: Sequence[tuple[int, int]] | None = None, *,
               layers: Sequence[int] | None = None, norm: bool = False) -> "EncoderOutput":
        """Per-image features and their mean over patches, in the weights' dtype, on the model's device (arguments
        as :meth:`pack` and :meth:`features`)."""
        batch = self.pack(images, grid_hw)
        counts = (batch.grid_hw[:, 0] * batch.grid_hw[:, 1]).tolist()  # host tensors: no device read
        batch = batch.to(self.model.patch_embed.weight.device, non_blocking=True)
        feats = self.features(batch, layers, norm)
        return EncoderOutput(list(feats.split(counts, dim=-2)), self.pool(batch, feats))

    def forward(self, images: Sequence, grid_hw: Sequence[tuple[int, int]] | None = None, *,
                layers: Sequence[int] | None = None, norm: bool = False) -> list[torch.Tensor]:
        """Per image ``(grid_h * grid_w, d)`` final-LayerNorm features, or ``(len(layers), grid_h * grid_w, d)``
        block outputs with ``layers`` (:meth:`features`); :meth:`encode` gives the pooled features too."""
        return self.encode(images, grid_hw, layers=layers, norm=norm).patches


@dataclass
class EncoderOutput:
    """What :meth:`VisionEncoder.encode` returns."""

    patches: list[torch.Tensor]
    """Per image ``(grid_h * grid_w, d)``; ``(len(layers), grid_h * grid_w, d)`` with ``layers``."""
    pooled: torch.Tensor
    """``(n, d)``, or ``(len(layers), n, d)``: each image's mean over its patches."""


def load_encoder(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 image_size: int | str | None = None, attn_backend: str = "auto") -> VisionEncoder:
    """The vision encoder of a checkpoint (any form :func:`~genlip_fast.checkpoint.load.load_model` reads), in
    ``dtype`` on ``device``.

    ``image_size`` None preprocesses as the checkpoint does: genlip_fast runs keep each image's aspect ratio
    (16–1024 patches, stage 2's rule), the authors' imported weights follow their processor (SigLIP's 224 squash
    for their stage-1 models, Qwen2-VL's ``smart_resize`` for the native-aspect ones); an int gives a fixed square
    (genlip_fast: shorter side + centre crop; the authors': squash), "native" the native aspect ratio. Call it with
    a list of PIL images / uint8 arrays (or patches with grids); it returns per-image ``(grid_h * grid_w, d)``
    final-LayerNorm features (:meth:`VisionEncoder.forward`; ``layers=`` for other blocks, :meth:`~VisionEncoder.
    encode` for pooled features too).
    """
    from ..checkpoint.load import load_model  # the checkpoint readers (DCP) load only when a checkpoint is read

    model, inputs = load_model(path, need_text=False)
    model.set_backends(attn=attn_backend)
    return VisionEncoder(model, inputs.image.sized(image_size)).to(device=device, dtype=dtype).eval()
