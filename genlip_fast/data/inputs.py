"""Images to patches for captioning and encoding: the data pipeline's geometry and normalisation, with the pixel
statistics of the checkpoint at hand.

Geometry comes from :mod:`genlip_fast.data.transforms` (stage 2: native aspect ratio within 16–1024 patches,
:func:`~genlip_fast.data.transforms.stage2_grid`; stage 1: shorter side to ``image_size`` and a centre crop) and so
does normalisation (:func:`~genlip_fast.data.transforms.normalize`, by the checkpoint's ``data.pixel_norm``: CLIP's
mean and std for genlip_fast runs by default, 0.5 / 0.5 for the authors' weights), so an image becomes the same
patches here as in training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .transforms import PIXEL_NORMS, grid_for, open_rgb, pixel_stats, resize_image, to_patches

AUTHORS_PIXEL_MEAN, AUTHORS_PIXEL_STD = PIXEL_NORMS["half"]
"""SigLIP2's processor statistics, which the authors' runs use (``data.pixel_norm = "half"``)."""


def open_image(src: str | Path | bytes, name: str = ""):
    """A file (path or bytes) as an RGB PIL image, EXIF orientation applied as the decoders do
    (:func:`~genlip_fast.data.transforms.open_rgb`); a clear error naming the file."""
    from PIL import UnidentifiedImageError

    name = name or (str(src) if not isinstance(src, bytes) else "image bytes")
    try:
        return open_rgb(src if isinstance(src, bytes) else Path(src).read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"no image file at {src}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{name}: not a readable image ({e})") from None


@dataclass
class ImageTransform:
    """How a checkpoint's model sees an image: geometry and pixel statistics."""

    patch_size: int = 16
    """Patch side in pixels."""
    min_patches: int = 16
    """Native aspect ratio: fewest patches per image."""
    max_patches: int = 1024
    """Native aspect ratio: most patches per image."""
    image_size: int | None = None
    """None: native aspect ratio (stage 2, the default); N: shorter side to N and a centre N x N crop (stage 1)."""
    pixel_mean: tuple[float, float, float] = PIXEL_NORMS["clip"][0]
    """Per-channel mean the weights expect (the run's data.pixel_norm: CLIP's by default, 0.5 for the authors')."""
    pixel_std: tuple[float, float, float] = PIXEL_NORMS["clip"][1]
    """Per-channel std the weights expect."""

    def __post_init__(self):
        self.pixel_mean, self.pixel_std = pixel_stats((self.pixel_mean, self.pixel_std))
        if self.image_size is not None and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size {self.patch_size}")

    @classmethod
    def of_data(cls, data: DataConfig | dict, *, stage: int | None = None) -> "ImageTransform":
        """How a run's ``[data]`` config (a :class:`DataConfig`, or its dict in a checkpoint's job config; fields it
        lacks take today's defaults) turns images into patches: its patch size and range and ``pixel_norm``;
        ``stage`` 1 crops to its ``image_size``, 2 keeps the native aspect ratio (default: the run's stage)."""
        d = {**dataclasses.asdict(DataConfig()), **(data if isinstance(data, dict) else dataclasses.asdict(data))}
        mean, std = pixel_stats(d["pixel_norm"])
        return cls(patch_size=d["patch_size"], min_patches=d["min_patches"], max_patches=d["max_patches"],
                   image_size=d["image_size"] if (stage or d["stage"]) == 1 else None, pixel_mean=mean, pixel_std=std)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The ``(grid_h, grid_w)`` an ``height x width`` image gets."""
        stage = 1 if self.image_size else 2
        return grid_for(height, width, stage=stage, image_size=self.image_size or 0, patch=self.patch_size,
                        min_patches=self.min_patches, max_patches=self.max_patches)

    def resize(self, image):
        """A PIL RGB image -> the PIL image the model sees (resized bicubic; centre-cropped in stage 1)."""
        return resize_image(image, stage=1 if self.image_size else 2, image_size=self.image_size or 0,
                            patch=self.patch_size, min_patches=self.min_patches, max_patches=self.max_patches)

    def __call__(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """A PIL image or a uint8 ``(H, W, 3)`` array/tensor -> ``(patches (grid_h * grid_w, 3 * p * p) float32,
        (grid_h, grid_w))``."""
        from PIL import Image

        if isinstance(image, torch.Tensor):
            image = image.cpu().numpy()
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"an image array must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image or a uint8 (H, W, 3) array, got {type(image).__name__}")
        return self.to_patches(self.resize(image.convert("RGB")))

    def to_patches(self, resized) -> tuple[torch.Tensor, tuple[int, int]]:
        """An image :meth:`resize` made -> normalised patches and the grid."""
        return to_patches(resized, self.patch_size, (self.pixel_mean, self.pixel_std))

    def decode(self, images: list[bytes], decoder: str = "pillow") -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Encoded files -> patches and grids, decoded by Pillow or by NVIDIA DALI (on the GPU when there is one)."""
        if decoder == "pillow":
            return [self(open_image(b)) for b in images]
        if decoder != "dali":
            raise ValueError(f"decoder must be 'pillow' or 'dali', got {decoder!r}")
        from .dali import DaliDecoder, dali_available, gpu_count

        if not dali_available():
            raise RuntimeError("decoder 'dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130")
        dali = DaliDecoder(stage=1 if self.image_size else 2, image_size=self.image_size or 0, patch=self.patch_size,
                           min_patches=self.min_patches, max_patches=self.max_patches,
                           pixel_norm=(self.pixel_mean, self.pixel_std), batch_size=max(1, len(images)),
                           num_threads=2, device_id=0 if gpu_count() else None)
        out = dali(images)
        if any(o is None for o in out):
            raise ValueError(f"DALI could not decode image(s) {[i for i, o in enumerate(out) if o is None]}")
        return [(p.cpu(), g) for p, g in out]

    def to_dict(self) -> dict:
        return {"patch_size": self.patch_size, "min_patches": self.min_patches, "max_patches": self.max_patches,
                "image_size": self.image_size, "pixel_mean": list(self.pixel_mean),
                "pixel_std": list(self.pixel_std)}


@dataclass
class InputSpec:
    """How to talk to a checkpoint: its tokenizer, prompt and stop words, and how it sees images. Stored in the
    meta.json of an imported checkpoint; derived from the job config for a genlip_fast run."""

    tokenizer: str = "demo"
    """'demo', 'qwen', or a local tokenizer.json (see genlip_fast.data.tokenizer)."""
    prompt: str = ""
    """Text after the image that the model was trained with (the authors': "Describe the image in detail.")."""
    stop: tuple[str, ...] = ()
    """Tokens that end a caption besides the tokenizer's end-of-text (the authors': "<|im_end|>")."""
    image: ImageTransform = field(default_factory=ImageTransform)
    """Geometry and pixel statistics."""

    def to_dict(self) -> dict:
        return {"tokenizer": self.tokenizer, "prompt": self.prompt, "stop": list(self.stop),
                "image": self.image.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(tokenizer=d["tokenizer"], prompt=d.get("prompt", ""), stop=tuple(d.get("stop", ())),
                   image=ImageTransform(**d.get("image", {})))
