"""Image decode on NVIDIA DALI: checked bytes in, normalised ``(3, H, W)`` images out, patchified right after.

One graph for both devices: with a GPU the decoder runs ``device="mixed"`` (nvJPEG) and resize and normalisation run
on the GPU; without one the same graph runs on DALI's CPU backend (``device_id=None``), which is how tests run.

* stage 1: resize the shorter side to ``image_size`` (bicubic, antialiased), centre-crop ``image_size`` square, both
  placed by :func:`~genlip_fast.data.transforms.stage1_geometry` as on the host;
* stage 2: per-sample target size from the image's own header (``fn.peek_image_shape``) through
  :func:`~genlip_fast.data.transforms.stage2_grid` — the same expression the host path evaluates on numbers.

Bytes come in through ``fn.external_source`` from :class:`~genlip_fast.data.reader.ShardReader`, which has already
checked them: DALI's webdataset reader cannot skip a bad record, and a decoder error leaves a pipeline unusable. If a
decoder still fails on some batch (corrupt entropy-coded data passes a header check), the pipeline is rebuilt, each
image of that batch is decoded on the host to find the culprit, and the rest are decoded again.
"""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import numpy as np
import torch

from .transforms import PixelStats, patchify, patchify_batch, pixel_stats, stage1_geometry, stage2_grid

log = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_count() -> int:
    """CUDA devices DALI sees (0 without a GPU or driver)."""
    try:
        from nvidia.dali.backend import GetCUDADeviceCount

        return int(GetCUDADeviceCount())
    except Exception:  # noqa: BLE001 - no driver: no GPU
        return 0


def resolve_backend(name: str) -> tuple[str, int | None]:
    """``(kind, device_id)``: ``("dali", 0)`` on a GPU, ``("dali", None)`` for DALI's CPU mode, ``("host", None)``."""
    if name not in ("auto", "dali", "host"):
        raise ValueError(f"data backend must be 'auto', 'dali' or 'host', got {name!r}")
    if name == "host":
        return "host", None
    if not dali_available():
        if name == "dali":
            raise ImportError("data.backend='dali' but NVIDIA DALI is not installed: pip install '.[dali]'")
        warnings.warn("NVIDIA DALI is not installed: decoding images on the host with Pillow, which is much slower "
                      "(pip install '.[dali]')", RuntimeWarning, stacklevel=3)
        return "host", None
    if gpu_count() > 0:
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return "dali", device
    return "dali", None


def grid_ops():
    """:data:`~genlip_fast.data.transforms.NUMPY_OPS`' names over DALI data nodes (float32 arithmetic)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    return SimpleNamespace(
        const=lambda x: x if not isinstance(x, (int, float)) else float(x),
        sqrt=dmath.sqrt, floor=dmath.floor, ceil=dmath.ceil, clamp=dmath.clamp, min=dmath.min, max=dmath.max,
        select=lambda cond, a, b: (lambda t: t * a + (1.0 - t) * b)(fn.cast(cond, dtype=types.FLOAT)),
    )


class DaliDecoder:
    """``decoder(list_of_bytes) -> list[(patches, grid_hw) | None]``; ``None`` where an image could not be decoded.

    Patches are float32 ``(grid_h * grid_w, 3 * patch * patch)``, on the GPU when ``device_id`` is not None,
    normalised by ``pixel_norm`` (a name of ``transforms.PIXEL_NORMS`` or explicit ``(mean, std)``).
    """

    def __init__(self, *, stage: int, image_size: int, patch: int = 16, min_patches: int = 16,
                 max_patches: int = 1024, pixel_norm: str | PixelStats = "clip", batch_size: int = 64,
                 num_threads: int = 4, device_id: int | None = None):
        self.stage, self.image_size, self.patch = stage, image_size, patch
        self.mean, self.std = pixel_stats(pixel_norm)
        self.min_patches, self.max_patches = min_patches, max_patches
        self.batch_size, self.num_threads, self.device_id = batch_size, num_threads, device_id
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        self.failures = 0
        self._pipe = self._build()

    def _build(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import Pipeline

        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                        prefetch_queue_depth=1, exec_dynamic=True)
        gpu = self.device_id is not None
        with pipe:
            enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=False)
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
            shape = fn.peek_image_shape(enc)  # (H, W, C) from the header, EXIF orientation applied
            h = fn.cast(shape[0], dtype=types.FLOAT)
            w = fn.cast(shape[1], dtype=types.FLOAT)
            if self.stage == 1:
                S = self.image_size
                nh, nw, top, left = stage1_geometry(h, w, size=S, ops=grid_ops())
                img = fn.resize(img, resize_x=nw, resize_y=nh, interp_type=types.INTERP_CUBIC, antialias=True)
                start = fn.cast(fn.stack(top, left), dtype=types.INT32)  # whole numbers already
                img = fn.slice(img, start=start, shape=[S, S], axis_names="HW",
                               out_of_bounds_policy="trim_to_shape")
            else:
                gh, gw = stage2_grid(h, w, patch=self.patch, min_patches=self.min_patches,
                                     max_patches=self.max_patches, ops=grid_ops())
                img = fn.resize(img, resize_x=gw * float(self.patch), resize_y=gh * float(self.patch),
                                interp_type=types.INTERP_CUBIC, antialias=True)
            out = fn.crop_mirror_normalize(
                img, dtype=types.FLOAT, output_layout="CHW",
                mean=[255.0 * m for m in self.mean], std=[255.0 * s for s in self.std],
            )
            pipe.set_outputs(out)
        pipe.build()
        return pipe

    def _run(self, images: list[bytes]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        self._pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in images])
        (out,) = self._pipe.run()
        p = self.patch
        if self.stage == 1:
            if out.is_dense_tensor():
                x = self._to_torch(out.as_tensor())  # (B, 3, S, S)
            else:  # samples in separate buffers (the slice's output): copy one by one
                x = torch.stack([self._to_torch(out[i]) for i in range(len(images))])
            g = self.image_size // p
            x = patchify_batch(x, p)
            return [(x[i], (g, g)) for i in range(len(images))]
        res = []
        for i in range(len(images)):
            x = self._to_torch(out[i])  # (3, H, W)
            res.append((patchify(x, p).contiguous(), (x.shape[1] // p, x.shape[2] // p)))
        return res

    def _to_torch(self, t) -> torch.Tensor:
        """Copy a DALI tensor out (DALI reuses its buffers on the next run)."""
        if self.device_id is None:
            return torch.from_numpy(np.array(t, copy=True))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dst = torch.empty(tuple(t.shape()), dtype=torch.float32, device=self.device)
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device))
        return dst

    def __call__(self, images: list[bytes]) -> list[tuple[torch.Tensor, tuple[int, int]] | None]:
        if not images:
            return []
        if len(images) > self.batch_size:
            return [r for s in range(0, len(images), self.batch_size) for r in self(images[s:s + self.batch_size])]
        try:
            return self._run(images)
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses; the pipeline is now unusable
            self.failures += 1
            log.warning("DALI failed on a batch of %d images (%s); rebuilding and isolating the bad image",
                        len(images), str(e).splitlines()[0] if str(e) else type(e).__name__)
            self._pipe = self._build()
        ok = [host_decodes(b) for b in images]
        good = [b for b, g in zip(images, ok) if g]
        try:
            it = iter(self._run(good) if good else [])
        except Exception:  # noqa: BLE001 - still failing: give up on this batch, loudly
            self._pipe = self._build()
            return [None] * len(images)
        return [next(it) if g else None for g in ok]


def host_decodes(data: bytes) -> bool:
    """Whether Pillow decodes all of ``data`` without error (the slow, thorough check used after a DALI failure)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001
        return False
