"""Image transforms: the patch-grid math both decode paths share, header probing, the pixel normalisations, and the
host (Pillow) path (:func:`host_decode`, :class:`HostDecoder`: DALI's stand-in in the data pipeline).

The DALI graph (``dali.py``) runs the same steps on the GPU (or its CPU mode): stage 1 resizes the shorter side and
centre-crops a square; stage 2 keeps the aspect ratio and resizes to the grid :func:`stage2_grid` picks — the very
same function, evaluated on DALI data nodes there and on numbers here.
"""

from __future__ import annotations

import io
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch

log = logging.getLogger(__name__)

PixelStats = tuple[tuple[float, float, float], tuple[float, float, float]]
"""Per-channel ``(mean, std)`` of pixels scaled to [0, 1]: a patch value is ``(u8 / 255 - mean) / std``."""

PIXEL_NORMS: dict[str, PixelStats] = {
    # OpenAI CLIP's statistics, the usual choice for ViT vision encoders fed to MLLMs (genlip_fast's default)
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    # (u8 / 255 - 0.5) / 0.5, SigLIP-2's processor: what the authors' runs and released weights use
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
"""The pixel normalisations ``data.pixel_norm`` names. The host decode, the DALI graph and the captioning and
encoder inputs all take their statistics from here (:func:`pixel_stats`)."""


def pixel_stats(pixel_norm: str | PixelStats) -> PixelStats:
    """A name of :data:`PIXEL_NORMS`, or explicit ``(mean, std)`` (e.g. from a checkpoint's preprocessor config),
    -> ``(mean, std)`` as float triples; ``ValueError`` naming what is allowed otherwise."""
    if isinstance(pixel_norm, str):
        if pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"pixel normalisation {pixel_norm!r}: choose one of {sorted(PIXEL_NORMS)}")
        return PIXEL_NORMS[pixel_norm]
    mean, std = pixel_norm
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"pixel statistics need 3 means and 3 positive stds, got mean {mean}, std {std}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)

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


def image_ext(data: bytes) -> str | None:
    """The member extension encoded image bytes would carry (``jpg``, ``png``, ``webp``, or an unsupported format's,
    e.g. ``gif``) from the magic number; None when the bytes are no image format known here. For images stored
    without a file name (a Parquet column)."""
    if data.startswith(_MAGIC["jpeg"]):
        return "jpg"
    if data.startswith(_MAGIC["png"]):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((name for m, name in _OTHER_FORMATS.items() if data.startswith(m)), None)


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's frame header, by walking its marker segments from the start up to the start
    of scan (every segment's length must lead to the next marker); None when the walk fails or finds no frame
    header or size — :func:`probe_image` then asks Pillow, which names what is wrong. A few microseconds, where
    Pillow's header parse (in Python) costs ~0.1 ms, the largest host cost per sample."""
    i, n, size = 2, len(data), None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # markers without a segment
            i += 2
            continue
        seg = (data[i + 2] << 8) | data[i + 3]
        if seg < 2:
            return None
        if m in _SOF_MARKERS:
            if i + 9 > n:
                return None
            size = ((data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8])
        elif m == 0xDA:  # start of scan: the header is complete
            return size if size and size[0] > 0 and size[1] > 0 else None
        i += 2 + seg
    return None


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
    if fmt == "jpeg" and (hw := jpeg_size(data)) is not None:
        return fmt, hw[0], hw[1]
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


def normalize(image_u8_hwc: np.ndarray, pixel_norm: str | PixelStats = "clip") -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(3, H, W)``: ``(u8 / 255 - mean) / std`` per channel (:func:`pixel_stats`)."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in pixel_stats(pixel_norm))
    x = torch.from_numpy(np.array(image_u8_hwc, copy=True)).permute(2, 0, 1).float().div_(255.0)
    return (x - mean) / std


def open_rgb(data: bytes):
    """Encoded bytes -> an RGB PIL image, EXIF orientation applied (the DALI decoder applies it too)."""
    from PIL import Image, ImageOps

    im = Image.open(io.BytesIO(data))
    im = ImageOps.exif_transpose(im)
    return im.convert("RGB")


def resize_image(image, *, stage: int, image_size: int, patch: int = 16, min_patches: int = 16,
                 max_patches: int = 1024):
    """An RGB PIL image -> the PIL image the model sees, resized bicubic: stage 1 the shorter side to
    ``image_size`` and the centre ``image_size`` square (:func:`stage1_geometry`); stage 2 the :func:`stage2_grid`
    grid times the patch (aspect ratio kept as closely as the grid allows). The one host resize: training's Pillow
    decode and the captioning / encoder inputs (``genlip_fast.data.inputs``) both call it."""
    from PIL import Image

    w, h = image.size
    if stage == 1:
        nh, nw, top, left = (int(v) for v in stage1_geometry(h, w, size=image_size))
        return image.resize((nw, nh), Image.BICUBIC).crop((left, top, left + image_size, top + image_size))
    gh, gw = grid_for(h, w, stage=2, image_size=0, patch=patch, min_patches=min_patches, max_patches=max_patches)
    return image.resize((gw * patch, gh * patch), Image.BICUBIC)


def to_patches(resized, patch: int, pixel_norm: str | PixelStats = "clip") -> tuple[torch.Tensor, tuple[int, int]]:
    """A resized image (PIL or uint8 ``(H, W, 3)``, sides multiples of ``patch``) -> normalised
    ``(patches (grid_h * grid_w, 3 * patch**2) float32, (grid_h, grid_w))``."""
    x = np.asarray(resized)
    return patchify(normalize(x, pixel_norm), patch), (x.shape[0] // patch, x.shape[1] // patch)


def host_decode(data: bytes, *, stage: int, image_size: int, patch: int = 16, min_patches: int = 16,
                max_patches: int = 1024, pixel_norm: str | PixelStats = "clip") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pillow decode of one image for ``stage`` (decode, :func:`resize_image`, normalise, patchify) ->
    ``(patches, grid_hw)``; ``ValueError`` on bytes that are not a readable image, or (stage 1) an image whose
    shorter side is under one patch."""
    from PIL import UnidentifiedImageError

    try:
        im = open_rgb(data)
        if stage == 1 and min(im.size) < patch:
            raise ValueError(f"image {im.size[0]}x{im.size[1]} is smaller than one {patch}x{patch} patch")
        im = resize_image(im, stage=stage, image_size=image_size, patch=patch, min_patches=min_patches,
                          max_patches=max_patches)
        return to_patches(im, patch, pixel_norm)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"unreadable image: {e}") from e


def decode_resize_crop(data: bytes, size: int, patch: int = 16,
                       pixel_norm: str | PixelStats = "clip") -> tuple[torch.Tensor, tuple[int, int]]:
    """Stage 1's :func:`host_decode`: resize the shorter side to ``size``, centre-crop ``size x size``."""
    return host_decode(data, stage=1, image_size=size, patch=patch, pixel_norm=pixel_norm)


def decode_native(data: bytes, patch: int = 16, min_patches: int = 16, max_patches: int = 1024,
                  pixel_norm: str | PixelStats = "clip") -> tuple[torch.Tensor, tuple[int, int]]:
    """Stage 2's :func:`host_decode`: native aspect ratio, ``min_patches``..``max_patches`` patches."""
    return host_decode(data, stage=2, image_size=0, patch=patch, min_patches=min_patches, max_patches=max_patches,
                       pixel_norm=pixel_norm)


class HostDecoder:
    """The DALI decoder's stand-in: ``decoder(list_of_bytes) -> list[(patches, grid_hw) | None]`` with Pillow
    (:func:`host_decode`), on a few threads (Pillow releases the GIL while decoding and resizing); ``None`` (logged)
    where an image cannot be decoded."""

    def __init__(self, *, stage: int, image_size: int, patch: int = 16, min_patches: int = 16,
                 max_patches: int = 1024, pixel_norm: str | PixelStats = "clip", num_threads: int = 4):
        self.kw = dict(stage=stage, image_size=image_size, patch=patch, min_patches=min_patches,
                       max_patches=max_patches, pixel_norm=pixel_stats(pixel_norm))
        self._pool = ThreadPoolExecutor(max(1, num_threads)) if num_threads > 1 else None

    def _one(self, data: bytes):
        try:
            return host_decode(data, **self.kw)
        except ValueError as e:
            log.warning("host decode failed: %s", e)
            return None

    def __call__(self, images: list[bytes]):
        if self._pool is None or len(images) < 2:
            return [self._one(b) for b in images]
        return list(self._pool.map(self._one, images))
