"""From shards to packed batches on the host: decode, resize, patchify, tokenise, pack.

This is the portable path (Pillow decode), used by the demo and wherever DALI is not installed.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .batch import PackedBatch, Sample
from .packing import Packer
from .tokenizer import Tokenizer
from .transforms import decode_resize_crop
from .webdataset import expand_shards, iter_shard

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class SkipCounter:
    """Samples dropped for bad input, by reason; each drop is logged with its shard and key."""

    counts: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, shard: str, key: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        log.warning("skipping %s in %s: %s%s", key, shard, reason, f" ({detail})" if detail else "")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def decode_sample(key: str, fields: dict[str, bytes], shard: str, tokenizer: Tokenizer, image_size: int,
                  patch: int, skipped: SkipCounter) -> Sample | None:
    """One webdataset record -> Sample, or None (counted and logged) when its input is bad."""
    image = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
    if image is None:
        skipped.skip("missing image", shard, key)
        return None
    if "txt" not in fields:
        skipped.skip("missing caption", shard, key)
        return None
    caption = fields["txt"].decode("utf-8", errors="replace").strip()
    if not caption:
        skipped.skip("empty caption", shard, key)
        return None
    try:
        patches, grid = decode_resize_crop(image, image_size, patch)
    except ValueError as e:
        skipped.skip("bad image", shard, key, str(e))
        return None
    ids = torch.tensor(tokenizer.encode(caption, add_eot=True), dtype=torch.int64)
    return Sample(patches, grid, ids, key=f"{shard}:{key}")


class HostSampleStream:
    """Endless stream of Samples from shards, reshuffled each epoch from ``seed``.

    Rank ``r`` of ``world_size`` reads shards ``r, r + world_size, ...`` of the epoch's order.
    """

    def __init__(self, shards: str, tokenizer: Tokenizer, *, image_size: int, patch: int = 16, seed: int = 0,
                 rank: int = 0, world_size: int = 1, loop: bool = True):
        self.shards = expand_shards(shards)
        self.tokenizer, self.image_size, self.patch = tokenizer, image_size, patch
        self.seed, self.rank, self.world_size, self.loop = seed, rank, world_size, loop
        self.skipped = SkipCounter()

    def __iter__(self) -> Iterator[Sample]:
        epoch = 0
        while True:
            order = list(self.shards)
            random.Random(self.seed + epoch).shuffle(order)
            for shard in order[self.rank :: self.world_size]:
                records = list(iter_shard(shard))
                random.Random(zlib.crc32(f"{self.seed}:{epoch}:{shard}".encode())).shuffle(records)
                for key, fields in records:
                    s = decode_sample(key, fields, shard, self.tokenizer, self.image_size, self.patch, self.skipped)
                    if s is not None:
                        yield s
            epoch += 1
            if not self.loop:
                return


def packed_batches(samples: Iterator[Sample], packer: Packer) -> Iterator[PackedBatch]:
    for s in samples:
        yield from packer.add(s)
    yield from packer.flush()
