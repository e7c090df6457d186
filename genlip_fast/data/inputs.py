"""Images to patches for captioning and encoding: the data pipeline's geometry and normalisation, with the pixel
statistics of the checkpoint at hand.

Geometry comes from :mod:`genlip_fast.data.transforms` (stage 2: native aspect ratio within 16–1024 patches,
:func:`~genlip_fast.data.transforms.stage2_grid`; stage 1: shorter side to ``image_size`` and a centre crop) and so
does normalisation (:func:`~genlip_fast.data.transforms.normalize`, by the checkpoint's ``data.pixel_norm``: CLIP's
mean and std for genlip_fast runs by default, 0.5 / 0.5 for the authors' weights), so an image becomes the same
patches here as in training. Checkpoints imported from the authors resize as their processors did instead
(``resize_rule = "siglip_qwen2vl"``: SigLIP's bilinear squash at a fixed size, Qwen2-VL's ``smart_resize`` at
native aspect ratio), which gives the same pixels as transformers' own processors configured like theirs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .transforms import PIXEL_NORMS, grid_for, open_rgb, pixel_stats, resize_image, to_patches

AUTHORS_PIXEL_MEAN, AUTHORS_PIXEL_STD = PIXEL_NORMS["half"]
"""SigLIP2's processor statistics, which the authors' runs use (``data.pixel_norm = "half"``)."""

RESIZE_RULES = ("genlip_fast", "siglip_qwen2vl")
"""``ImageTransform.resize_rule``: genlip_fast's data pipeline, or the transformers processors the authors use."""


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule (its image processor's ``smart_resize``; the authors' native-aspect processor uses
    it with factor 16 and 4,096-262,144 pixels): ``(height, width)``, both multiples of ``factor``, the pixel
    count within [min_pixels, max_pixels], the aspect ratio kept as closely as that allows (Python's ``round``,
    half to even, as there). An aspect ratio past 200 is refused, as there. Restated, not imported: transformers is
    no runtime dependency, and the exported processor (``checkpoint/hf/image_processing_genlip_fast.py``) cannot
    import genlip_fast; a test holds the three equal."""
    if max(h, w) / min(h, w) > 200:
        raise ValueError(f"image {w}x{h}: absolute aspect ratio must be smaller than 200 (Qwen2-VL's resize rule)")
    h_bar, w_bar = round(h / factor) * factor, round(w / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        h_bar = max(factor, math.floor(h / beta / factor) * factor)
        w_bar = max(factor, math.floor(w / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar, w_bar = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return h_bar, w_bar


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


def image_size_arg(text: str) -> int | str:
    """A command line's ``--image-size`` (:meth:`ImageTransform.sized`): a square side in pixels, or "native"."""
    return text if text == "native" else int(text)


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
    """None: native aspect ratio (stage 2, the default); N: a fixed N x N square (stage 1)."""
    pixel_mean: tuple[float, float, float] = PIXEL_NORMS["clip"][0]
    """Per-channel mean the weights expect (the run's data.pixel_norm: CLIP's by default, 0.5 for the authors')."""
    pixel_std: tuple[float, float, float] = PIXEL_NORMS["clip"][1]
    """Per-channel std the weights expect."""
    resize_rule: str = "genlip_fast"
    """'genlip_fast': the data pipeline's (bicubic; fixed size: shorter side to N and the centre square; native:
    :func:`~genlip_fast.data.transforms.stage2_grid`). 'siglip_qwen2vl': the authors' processors (bilinear; fixed
    size: squashed to N x N as SigLIP's; native: Qwen2-VL's :func:`smart_resize` with factor patch_size and
    min_patches..max_patches patches' worth of pixels)."""

    def __post_init__(self):
        self.pixel_mean, self.pixel_std = pixel_stats((self.pixel_mean, self.pixel_std))
        if self.resize_rule not in RESIZE_RULES:
            raise ValueError(f"resize_rule must be one of {list(RESIZE_RULES)}, got {self.resize_rule!r}")
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

    def sized(self, image_size: int | str | None) -> "ImageTransform":
        """This transform at another size: None keeps its own, an int makes it a fixed square (its resize rule's
        fixed-size form), "native" the native aspect ratio."""
        if image_size is None:
            return self
        return dataclasses.replace(self, image_size=None if image_size == "native" else int(image_size))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The ``(grid_h, grid_w)`` an ``height x width`` image gets."""
        p = self.patch_size
        if self.resize_rule == "genlip_fast":
            stage = 1 if self.image_size else 2
            return grid_for(height, width, stage=stage, image_size=self.image_size or 0, patch=p,
                            min_patches=self.min_patches, max_patches=self.max_patches)
        if self.image_size:
            return self.image_size // p, self.image_size // p
        h, w = smart_resize(height, width, p, self.min_patches * p * p, self.max_patches * p * p)
        return h // p, w // p

    def resize(self, image):
        """A PIL RGB image -> the PIL image the model sees (:attr:`resize_rule`)."""
        if self.resize_rule == "genlip_fast":
            return resize_image(image, stage=1 if self.image_size else 2, image_size=self.image_size or 0,
                                patch=self.patch_size, min_patches=self.min_patches, max_patches=self.max_patches)
        from PIL import Image

        gh, gw = self.grid(image.height, image.width)
        return image.resize((gw * self.patch_size, gh * self.patch_size), Image.BILINEAR)

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
        if self.resize_rule != "genlip_fast":
            raise ValueError(f"decoder 'dali' resizes as genlip_fast's data pipeline; this checkpoint reads images "
                             f"with resize_rule {self.resize_rule!r}: use the pillow decoder")
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
                "pixel_std": list(self.pixel_std), "resize_rule": self.resize_rule}


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
