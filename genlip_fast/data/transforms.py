"""Image transforms: the patch-grid math both decode paths share, header probing, and the host (Pillow) path.

The DALI graph (``dali.py``) runs the same steps on the GPU (or its CPU mode): stage 1 resizes the shorter side and
centre-crops a square; stage 2 keeps the aspect ratio and resizes to the grid :func:`stage2_grid` picks — the very
same function, evaluated on DALI data nodes there and on numbers here.
"""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import numpy as np
import torch

# OpenAI CLIP statistics, the usual choice for ViT vision encoders fed to MLLMs.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Elementwise ops the grid math is written in; ``dali.grid_ops()`` gives the same names over DALI data nodes.
# float32 throughout, so both paths round identically.
_f32 = np.float32
NUMPY_OPS = SimpleNamespace(
    const=_f32,
    sqrt=lambda x: _f32(np.sqrt(_f32(x))),
    floor=lambda x: _f32(np.floor(x)),
    ceil=lambda x: _f32(np.ceil(x)),
    clamp=lambda x, lo, hi: _f32(min(max(x, lo), hi)),
    min=lambda a, b: _f32(min(a, b)),
    max=lambda a, b: _f32(max(a, b)),
    select=lambda cond, a, b: a if cond else b,
)


def stage2_grid(h, w, *, patch: int = 16, min_patches: int = 16, max_patches: int = 1024, ops=NUMPY_OPS):
    """Patch grid ``(rows, cols)`` for an ``h x w`` image at native aspect ratio (stage 2).

    The image is scaled so that its patch count is its native one (``h * w / patch**2``) clamped to
    ``[min_patches, max_patches]``; the shorter side gets ``round(scaled / patch)`` patches (at least 1), the longer
    side is rounded likewise and then clamped so the product stays in range. Any ``h, w >= 1`` gives a valid grid,
    1x2000 included (one row). Written in ``ops`` so the DALI graph evaluates the same expression per sample.
    Returns float32 values (whole numbers) of ``ops``' kind.
    """
    c = ops.const
    h, w = c(h), c(w)
    lo, hi = c(min_patches), c(max_patches)
    native = h * w / c(patch * patch)
    scale = ops.sqrt(ops.clamp(native, lo, hi) / native)
    short = ops.min(h, w) * scale / c(patch)
    long = ops.max(h, w) * scale / c(patch)
    g_short = ops.clamp(ops.floor(short + c(0.5)), c(1), hi)
    g_long = ops.clamp(ops.floor(long + c(0.5)), ops.ceil(lo / g_short), ops.floor(hi / g_short))
    tall = h > w
    return ops.select(tall, g_long, g_short), ops.select(tall, g_short, g_long)


def stage1_geometry(h, w, *, size: int, ops=NUMPY_OPS):
    """Stage 1: resize so the shorter side is ``size`` (the longer one rounded, never below ``size``), then crop
    the centre ``size x size`` square. Returns ``(resized_h, resized_w, top, left)``, float32 whole numbers of
    ``ops``' kind — the host path and the DALI graph both use this, so their crops sit on the same pixels."""
    c = ops.const
    h, w, S = c(h), c(w), c(size)
    s = S / ops.min(h, w)
    nh = ops.max(S, ops.floor(h * s + c(0.5)))
    nw = ops.max(S, ops.floor(w * s + c(0.5)))
    return nh, nw, ops.floor((nh - S) / c(2)), ops.floor((nw - S) / c(2))


def check_grid_limits(min_patches: int, max_patches: int) -> None:
    """Raise unless every image gets a grid within ``[min_patches, max_patches]``: the short side has at most
    ``round(sqrt(max_patches))`` patches, and some multiple of it must lie in the range."""
    if not 1 <= min_patches <= max_patches:
        raise ValueError(f"need 1 <= min_patches <= max_patches, got {min_patches}, {max_patches}")
    if max_patches - min_patches + 1 < math.floor(math.sqrt(max_patches) + 0.5):
        raise ValueError(f"[min_patches, max_patches] = [{min_patches}, {max_patches}] is too narrow for every "
                         f"aspect ratio to have a grid; widen it to at least {math.floor(math.sqrt(max_patches) + 0.5)}")


def grid_for(h: int, w: int, *, stage: int, image_size: int, patch: int, min_patches: int = 16,
             max_patches: int = 1024) -> tuple[int, int]:
    """The grid an ``h x w`` image gets in ``stage`` (host ints)."""
    if stage == 1:
        return image_size // patch, image_size // patch
    gh, gw = stage2_grid(h, w, patch=patch, min_patches=min_patches, max_patches=max_patches)
    return int(gh), int(gw)


def too_small(h: int, w: int, *, stage: int, patch: int) -> bool:
    """Stage 1 needs a shorter side of at least one patch (the crop would be mostly made up); stage 2 needs at least
    one patch worth of pixels (a 1x2000 strip is fine: it becomes one row of patches)."""
    return min(h, w) < patch if stage == 1 else h * w < patch * patch


class BadImage(ValueError):
    """Bytes the decoders must not see; ``reason`` is the counter's key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


_MAGIC = {"jpeg": (b"\xff\xd8\xff",), "png": (b"\x89PNG\r\n\x1a\n",)}
_OTHER_FORMATS = {b"GIF8": "gif", b"BM": "bmp", b"II*\x00": "tiff", b"MM\x00*": "tiff", b"\x00\x00\x00\x0cjP": "jp2"}


def probe_image(data: bytes) -> tuple[str, int, int]:
    """``(format, height, width)`` from the header alone, or :class:`BadImage`.

    Checks what makes the DALI decoders fail hard — which would end the pipeline — without decoding: the magic number
    (JPEG, PNG, WebP only), a readable header with the size, and a complete file (JPEG ends with its EOI marker, PNG
    with IEND, WebP's RIFF length fits). Costs tens of microseconds.
    """
    if len(data) < 16:
        raise BadImage("not an image", f"{len(data)} bytes")
    if data.startswith(_MAGIC["jpeg"]):
        fmt = "jpeg"
        if b"\xff\xd9" not in data[-1024:]:
            raise BadImage("truncated image", "JPEG without its end-of-image marker")
    elif data.startswith(_MAGIC["png"]):
        fmt = "png"
        if b"IEND" not in data[-32:]:
            raise BadImage("truncated image", "PNG without its IEND chunk")
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt = "webp"
        if int.from_bytes(data[4:8], "little") + 8 > len(data):
            raise BadImage("truncated image", "WebP shorter than its RIFF header says")
    else:
        other = next((name for m, name in _OTHER_FORMATS.items() if data.startswith(m)), None)
        if other:
            raise BadImage("unsupported format", other)
        raise BadImage("not an image", f"starts with {data[:8]!r}")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header only
            w, h = im.size
    except Exception as e:  # noqa: BLE001 - any failure to read the header means the decoder would fail too
        raise BadImage("corrupt image", f"{type(e).__name__}: {e}") from None
    if w < 1 or h < 1:
        raise BadImage("corrupt image", f"size {w}x{h}")
    return fmt, h, w


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """``(C, H, W)`` with H, W multiples of ``patch`` -> ``(H/p * W/p, C*p*p)``, rows row-major, each (c, y, x)."""
    C, H, W = image.shape
    if H % patch or W % patch:
        raise ValueError(f"image {H}x{W} is not a multiple of the patch size {patch}")
    x = image.reshape(C, H // patch, patch, W // patch, patch).permute(1, 3, 0, 2, 4)
    return x.reshape((H // patch) * (W // patch), C * patch * patch)


def patchify_batch(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/p * W/p, C*p*p)``, each image as :func:`patchify` lays it out."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // patch) * (W // patch), C * patch * patch)


def normalize(image_u8_hwc: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(3, H, W)`` normalised by the CLIP mean and std."""
    x = torch.from_numpy(np.array(image_u8_hwc, copy=True)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (x - mean) / std


def _open_rgb(data: bytes):
    from PIL import Image, ImageOps

    im = Image.open(io.BytesIO(data))
    im = ImageOps.exif_transpose(im)  # the DALI decoder applies EXIF orientation too
    return im.convert("RGB")


def decode_resize_crop(data: bytes, size: int, patch: int = 16) -> tuple[torch.Tensor, tuple[int, int]]:
    """PIL path for stage 1: decode, resize the shorter side to ``size``, centre-crop ``size x size``, normalise,
    patchify. Returns ``(patches, grid_hw)``; raises ``ValueError`` on bytes that are not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = _open_rgb(data)
        w, h = im.size
        if min(w, h) < patch:
            raise ValueError(f"image {w}x{h} is smaller than one {patch}x{patch} patch")
        nh, nw, top, left = (int(v) for v in stage1_geometry(h, w, size=size))
        im = im.resize((nw, nh), Image.BICUBIC)
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"unreadable image: {e}") from e
    return patchify(normalize(arr), patch), (size // patch, size // patch)


def decode_native(data: bytes, patch: int = 16, min_patches: int = 16,
                  max_patches: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """PIL path for stage 2: decode, resize to the :func:`stage2_grid` grid (aspect ratio kept as closely as the
    grid allows), normalise, patchify. Returns ``(patches, grid_hw)``; ``ValueError`` on unreadable bytes."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = _open_rgb(data)
        w, h = im.size
        gh, gw = grid_for(h, w, stage=2, image_size=0, patch=patch, min_patches=min_patches, max_patches=max_patches)
        arr = np.asarray(im.resize((gw * patch, gh * patch), Image.BICUBIC))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"unreadable image: {e}") from e
    return patchify(normalize(arr), patch), (gh, gw)
