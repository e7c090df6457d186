"""From shards to packed batches on the host: decode, resize, patchify, tokenise, pack.

This is the portable path (Pillow decode): the demo's held-out captions use :class:`HostSampleStream`, and
:class:`HostDecoder` stands in for DALI in :mod:`~genlip_fast.data.pipeline` where DALI is not installed.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .batch import PackedBatch, Sample
from .packing import Packer
from .reader import IMAGE_EXTS, SkipCounter, check_fields
from .tokenizer import Tokenizer
from .transforms import BadImage, decode_native, decode_resize_crop
from .webdataset import SHARD_ERRORS, expand_shards, iter_shard, shard_error

log = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTS", "HostDecoder", "HostSampleStream", "SkipCounter", "decode_sample", "packed_batches"]


def host_decode(data: bytes, *, stage: int, image_size: int, patch: int = 16, min_patches: int = 16,
                max_patches: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pillow decode of one image for ``stage`` -> ``(patches, grid_hw)``; ``ValueError`` on unreadable bytes."""
    if stage == 1:
        return decode_resize_crop(data, image_size, patch)
    return decode_native(data, patch, min_patches, max_patches)


class HostDecoder:
    """The DALI decoder's stand-in: ``decoder(list_of_bytes) -> list[(patches, grid_hw) | None]`` with Pillow, on a
    few threads (Pillow releases the GIL while decoding and resizing)."""

    def __init__(self, *, stage: int, image_size: int, patch: int = 16, min_patches: int = 16,
                 max_patches: int = 1024, num_threads: int = 4):
        self.kw = dict(stage=stage, image_size=image_size, patch=patch, min_patches=min_patches,
                       max_patches=max_patches)
        self.failures = 0
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


def decode_sample(key: str, fields: dict[str, bytes], shard: str, tokenizer: Tokenizer, image_size: int,
                  patch: int, skipped: SkipCounter, *, stage: int = 1, min_patches: int = 16,
                  max_patches: int = 1024, caption_field: str = "") -> Sample | None:
    """One webdataset record -> Sample, or None (counted and logged) when its input is bad."""
    try:
        image, caption, _ = check_fields(fields, stage=stage, patch=patch, caption_field=caption_field)
        patches, grid = host_decode(image, stage=stage, image_size=image_size, patch=patch,
                                    min_patches=min_patches, max_patches=max_patches)
    except BadImage as e:
        skipped.skip(e.reason, shard, key, e.detail)
        return None
    except ValueError as e:
        skipped.skip("undecodable image", shard, key, str(e))
        return None
    ids = torch.tensor(tokenizer.encode(caption, add_eot=True), dtype=torch.int64)
    return Sample(patches, grid, ids, key=f"{shard}:{key}")


class HostSampleStream:
    """Endless stream of Samples from shards, reshuffled each epoch from ``seed`` (simple, single-threaded).

    Rank ``r`` of ``world_size`` reads shards ``r, r + world_size, ...`` of the epoch's order.
    """

    def __init__(self, shards: str, tokenizer: Tokenizer, *, image_size: int, patch: int = 16, seed: int = 0,
                 rank: int = 0, world_size: int = 1, loop: bool = True, stage: int = 1, min_patches: int = 16,
                 max_patches: int = 1024, caption_field: str = ""):
        self.shards = expand_shards(shards)
        self.tokenizer, self.image_size, self.patch = tokenizer, image_size, patch
        self.seed, self.rank, self.world_size, self.loop = seed, rank, world_size, loop
        self.kw = dict(stage=stage, min_patches=min_patches, max_patches=max_patches, caption_field=caption_field)
        self.skipped = SkipCounter()

    def __iter__(self) -> Iterator[Sample]:
        epoch = 0
        while True:
            order = list(self.shards)
            random.Random(self.seed + epoch).shuffle(order)
            for shard in order[self.rank :: self.world_size]:
                try:
                    records = list(iter_shard(shard))
                except SHARD_ERRORS as e:
                    self.skipped.bad_shard(shard, shard_error(e))
                    continue
                random.Random(zlib.crc32(f"{self.seed}:{epoch}:{shard}".encode())).shuffle(records)
                for key, fields in records:
                    s = decode_sample(key, fields, shard, self.tokenizer, self.image_size, self.patch, self.skipped,
                                      **self.kw)
                    if s is not None:
                        yield s
            epoch += 1
            if not self.loop:
                return


def packed_batches(samples: Iterator[Sample], packer: Packer) -> Iterator[PackedBatch]:
    for s in samples:
        yield from packer.add(s)
    yield from packer.flush()
