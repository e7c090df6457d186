"""Host-side image transforms (the fallback path and the demo): resize, crop, normalise, patchify.

The GPU path does the same steps inside the DALI graph; both share these constants.
"""

from __future__ import annotations

import io

import numpy as np
import torch

# OpenAI CLIP statistics, the usual choice for ViT vision encoders fed to MLLMs.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """``(C, H, W)`` with H, W multiples of ``patch`` -> ``(H/p * W/p, C*p*p)``, rows row-major, each (c, y, x)."""
    C, H, W = image.shape
    if H % patch or W % patch:
        raise ValueError(f"image {H}x{W} is not a multiple of the patch size {patch}")
    x = image.reshape(C, H // patch, patch, W // patch, patch).permute(1, 3, 0, 2, 4)
    return x.reshape((H // patch) * (W // patch), C * patch * patch)


def normalize(image_u8_hwc: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(3, H, W)`` normalised by the CLIP mean and std."""
    x = torch.from_numpy(np.array(image_u8_hwc, copy=True)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (x - mean) / std


def decode_resize_crop(data: bytes, size: int, patch: int = 16) -> tuple[torch.Tensor, tuple[int, int]]:
    """PIL path for stage 1: decode, resize the shorter side to ``size``, centre-crop ``size x size``, normalise,
    patchify. Returns ``(patches, grid_hw)``; raises ``ValueError`` on bytes that are not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            w, h = im.size
            if min(w, h) < patch:
                raise ValueError(f"image {w}x{h} is smaller than one {patch}x{patch} patch")
            s = size / min(w, h)
            nw, nh = max(size, round(w * s)), max(size, round(h * s))
            im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"unreadable image: {e}") from e
    return patchify(normalize(arr), patch), (size // patch, size // patch)
