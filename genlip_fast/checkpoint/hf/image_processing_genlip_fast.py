"""Images to GenLIP patches, as genlip_fast's own inputs make them (bit for bit), for transformers.

Two resize rules, each with a fixed-size and a native-aspect form:

* ``"genlip_fast"`` (models trained with genlip_fast): bicubic; fixed size: the shorter side to ``image_size``
  (the longer one rounded) and the centre square; native aspect: the patch grid of genlip_fast's stage 2 (the
  native patch count clamped to [min_patches, max_patches], sides rounded to whole patches).
* ``"siglip_qwen2vl"`` (the GenLIP authors' released weights): bilinear; fixed size: squashed to ``image_size``
  square, as SigLIP's processor; native aspect: Qwen2-VL's ``smart_resize`` (factor p, min_patches * p^2 to
  max_patches * p^2 pixels).

Then ``(u8 / 255 - mean) / std`` in float32. Fixed size returns ``pixel_values (B, 3, S, S)``; native aspect returns
``pixel_values (N, 3*p*p)`` (every image's patches in a row, row-major, each flattened (c, y, x)) with
``image_grid_thw (B, 3)`` = (1, rows, cols), Qwen2-VL's layout. Imports only numpy, Pillow and transformers.

Remote code cannot import genlip_fast, so three rules are restated here: :func:`native_grid` is
``genlip_fast.data.transforms.stage2_grid``, :func:`shorter_side_geometry` its ``stage1_geometry`` and
:func:`smart_resize` ``genlip_fast.data.inputs.smart_resize`` (itself Qwen2-VL's, whose module path differs between
transformers versions). ``tests/test_hf_export.py`` holds each equal to its original over many sizes; change them
together.
"""

import math

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

RULES = ("genlip_fast", "siglip_qwen2vl")
F32 = np.float32


def native_grid(h, w, patch, min_patches, max_patches):
    """genlip_fast's stage-2 grid (rows, cols) for an h x w image, computed in float32 as genlip_fast does: the
    patch count scaled to [min_patches, max_patches], the shorter side rounded to whole patches (at least one), the
    longer side rounded and clamped so the product stays in range."""
    h, w, lo, hi = F32(h), F32(w), F32(min_patches), F32(max_patches)
    native = h * w / F32(patch * patch)
    scale = F32(np.sqrt(F32(min(max(native, lo), hi) / native)))
    short = min(h, w) * scale / F32(patch)
    long = max(h, w) * scale / F32(patch)
    g_short = min(max(F32(np.floor(short + F32(0.5))), F32(1)), hi)
    g_long = min(max(F32(np.floor(long + F32(0.5))), F32(np.ceil(lo / g_short))), F32(np.floor(hi / g_short)))
    return (int(g_long), int(g_short)) if h > w else (int(g_short), int(g_long))


def shorter_side_geometry(h, w, size):
    """genlip_fast's stage-1 geometry: (resized_h, resized_w, top, left) of the shorter side to ``size`` (the other
    rounded, never below ``size``) and the centre ``size`` square, in float32 as genlip_fast computes it."""
    h, w, S = F32(h), F32(w), F32(size)
    s = S / min(h, w)
    nh = max(S, F32(np.floor(h * s + F32(0.5))))
    nw = max(S, F32(np.floor(w * s + F32(0.5))))
    return int(nh), int(nw), int(np.floor((nh - S) / F32(2))), int(np.floor((nw - S) / F32(2)))


def smart_resize(h, w, factor, min_pixels, max_pixels):
    """Qwen2-VL's resize rule: both sides multiples of ``factor``, the pixel count within [min_pixels, max_pixels],
    the aspect ratio kept as closely as that allows; aspect ratios past 200 are refused, as there."""
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


def to_pil(image):
    """A PIL image, or a uint8 array / tensor (H, W, 3) or (3, H, W), as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if hasattr(image, "numpy"):  # a torch tensor, without importing torch
        image = image.detach().cpu().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"GenLIPImageProcessor takes PIL images or uint8 (H, W, 3) / (3, H, W) arrays, "
                         f"got {a.dtype} {a.shape}")
    return Image.fromarray(a)


class GenLIPImageProcessor(BaseImageProcessor):
    r"""Resize, normalise and (native aspect) patchify images for ``GenLIPVisionModel``.

    Args:
        patch_size: patch side p in pixels.
        image_size: fixed square side S; None: native aspect ratio.
        min_patches / max_patches: native aspect: the patch count's range.
        resize_rule: "genlip_fast" or "siglip_qwen2vl" (module docstring).
        image_mean / image_std: per-channel statistics of ``u8 / 255``.
        crop_size: ``{"height": S, "width": S}``, the size LLaVA-style code makes dummy and tiled images at
            (default: ``image_size``).
        size: derived from the above (the value passed is replaced).
    Other keys of ``preprocessor_config.json`` (``resample``, ``min_pixels``, ...) are for the transformers processor
    the file may also name, which gives the same pixels; they are kept but not read here.
    """

    model_input_names = ["pixel_values", "image_grid_thw"]

    def __init__(self, patch_size=16, image_size=None, min_patches=16, max_patches=1024, resize_rule="genlip_fast",
                 image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711),
                 crop_size=None, size=None, **kwargs):
        super().__init__(**kwargs)
        if resize_rule not in RULES:
            raise ValueError(f"GenLIPImageProcessor.resize_rule must be one of {list(RULES)}, got {resize_rule!r}")
        if image_size is not None and image_size % patch_size:
            raise ValueError(f"GenLIPImageProcessor.image_size {image_size} is not a multiple of patch_size "
                             f"{patch_size}")
        if not 1 <= min_patches <= max_patches:
            raise ValueError(f"GenLIPImageProcessor: need 1 <= min_patches <= max_patches, got {min_patches}, "
                             f"{max_patches}")
        self.patch_size, self.image_size, self.resize_rule = patch_size, image_size, resize_rule
        self.min_patches, self.max_patches = min_patches, max_patches
        self.image_mean, self.image_std = [float(m) for m in image_mean], [float(s) for s in image_std]
        S = image_size
        self.crop_size = crop_size or {"height": S, "width": S}
        # ``size`` in the meaning of the transformers processor each form resembles (derived, never read here):
        # CLIP's shorter side, SigLIP's square, Qwen2-VL's pixel range.
        px = patch_size * patch_size
        self.size = ({"shortest_edge": min_patches * px, "longest_edge": max_patches * px} if S is None else
                     {"shortest_edge": S} if resize_rule == "genlip_fast" else {"height": S, "width": S})

    def resize_image(self, image):
        """An RGB PIL image -> the PIL image the model sees (sides multiples of the patch size)."""
        w, h = image.size
        p, S = self.patch_size, self.image_size
        if self.resize_rule == "genlip_fast":
            if S is not None:
                nh, nw, top, left = shorter_side_geometry(h, w, S)
                return image.resize((nw, nh), Image.BICUBIC).crop((left, top, left + S, top + S))
            rows, cols = native_grid(h, w, p, self.min_patches, self.max_patches)
            return image.resize((cols * p, rows * p), Image.BICUBIC)
        if S is not None:
            return image.resize((S, S), Image.BILINEAR)
        nh, nw = smart_resize(h, w, p, self.min_patches * p * p, self.max_patches * p * p)
        return image.resize((nw, nh), Image.BILINEAR)

    def normalize_image(self, image):
        """A resized PIL image -> float32 ``(3, H, W)``: ``(u8 / 255 - mean) / std``."""
        x = np.asarray(image).astype(np.float32) / F32(255.0)
        x = (x - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def preprocess(self, images, return_tensors=None, **kwargs):
        """One image or a list (PIL, or uint8 arrays / tensors) -> ``BatchFeature`` (module docstring)."""
        if kwargs:
            raise ValueError(f"GenLIPImageProcessor takes no per-call options, got {sorted(kwargs)}")
        if not isinstance(images, (list, tuple)):
            images = [images]
        pixels = [self.normalize_image(self.resize_image(to_pil(im))) for im in images]
        if self.image_size is not None:
            return BatchFeature({"pixel_values": np.stack(pixels)}, tensor_type=return_tensors)
        p = self.patch_size
        patches, grids = [], []
        for x in pixels:
            C, H, W = x.shape
            rows, cols = H // p, W // p
            patches.append(x.reshape(C, rows, p, cols, p).transpose(1, 3, 0, 2, 4).reshape(rows * cols, C * p * p))
            grids.append([1, rows, cols])
        return BatchFeature({"pixel_values": np.concatenate(patches), "image_grid_thw": np.array(grids, np.int64)},
                            tensor_type=return_tensors)


__all__ = ["GenLIPImageProcessor"]
