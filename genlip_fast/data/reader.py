"""Reading samples from indexed shards, checking them before any decoder sees them.

DALI treats a bad image as a critical error that leaves its pipeline unusable, so every record is checked here, on
the host, from its bytes: an image member of a supported format with a readable header and a complete file, a size
of at least one patch, and a non-empty caption. A record that fails is skipped — never silently: it is counted by
reason and logged with its shard and key.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from .sampler import ShardSampler
from .transforms import BadImage, probe_image, too_small
from .webdataset import load_index, read_members

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
OTHER_IMAGE_EXTS = ("gif", "bmp", "tif", "tiff", "jp2", "avif", "heic", "ppm", "pgm")


@dataclass
class SkipCounter:
    """Samples dropped for bad input, by reason; each drop is logged with its shard and key."""

    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self._lock = threading.Lock()

    def skip(self, reason: str, shard: str, key: str, detail: str = "") -> None:
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1
        log.warning("skipping %s in %s: %s%s", key, shard, reason, f" ({detail})" if detail else "")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Record:
    """One checked sample: bytes the decoders can take and its caption text."""

    epoch: int
    pos: int
    shard: str
    key: str
    image: bytes
    caption: str
    hw: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.shard}:{self.key}"


@dataclass
class Skipped:
    """A sample that failed its checks (already logged); counted when the stream reaches it."""

    epoch: int
    pos: int
    shard: str
    key: str
    reason: str
    detail: str = ""


def caption_of(fields: dict[str, bytes], caption_field: str = "") -> str | None:
    """The caption text, or None when it is missing (no .txt, or no .json / field when ``caption_field`` is set)."""
    if caption_field:
        if "json" not in fields:
            return None
        try:
            value = json.loads(fields["json"])
        except ValueError:
            return None
        for part in caption_field.split("."):  # "meta.caption" walks nested objects
            value = value.get(part) if isinstance(value, dict) else None
        return value if isinstance(value, str) else None
    if "txt" not in fields:
        return None
    return fields["txt"].decode("utf-8", errors="replace")


def check_fields(fields: dict[str, bytes], *, stage: int, patch: int, caption_field: str = "",
                 ) -> tuple[bytes, str, tuple[int, int]]:
    """``(image bytes, caption, (h, w))`` of a good record, or :class:`BadImage` whose ``reason`` says why not."""
    ext = next((e for e in IMAGE_EXTS if e in fields), None)
    if ext is None:
        other = next((e for e in OTHER_IMAGE_EXTS if e in fields), None)
        raise BadImage("unsupported format", other) if other else BadImage("missing image")
    caption = caption_of(fields, caption_field)
    if caption is None:
        raise BadImage("missing caption", caption_field or "txt")
    caption = caption.strip()
    if not caption:
        raise BadImage("empty caption")
    image = fields[ext]
    _, h, w = probe_image(image)
    if too_small(h, w, stage=stage, patch=patch):
        raise BadImage("image smaller than a patch", f"{w}x{h}")
    return image, caption, (h, w)


class ShardReader:
    """Reads a rank's stream (see :class:`ShardSampler`) as :class:`Record` / :class:`Skipped` items.

    Shard indexes are loaded once for their sample counts, then kept for the few shards being read (LRU), as are
    open file handles.
    """

    def __init__(self, shards: list[str], *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 1, stage: int = 1, patch: int = 16, caption_field: str = "", keep_open: int = 8):
        self.shards = list(shards)
        self.stage, self.patch, self.caption_field, self.keep_open = stage, patch, caption_field, keep_open
        self._index: OrderedDict[int, list] = OrderedDict()
        self._files: OrderedDict[int, object] = OrderedDict()
        counts = []
        for i in range(len(self.shards)):
            counts.append(len(self._shard_index(i)))
        self.sampler = ShardSampler(counts, seed=seed, rank=rank, world_size=world_size, num_workers=num_workers)
        self.digest = self.sampler.digest(self.shards)

    def _shard_index(self, i: int) -> list:
        if i in self._index:
            self._index.move_to_end(i)
            return self._index[i]
        idx = load_index(self.shards[i])
        self._index[i] = idx
        while len(self._index) > self.keep_open:
            self._index.popitem(last=False)
        return idx

    def _file(self, i: int):
        if i in self._files:
            self._files.move_to_end(i)
            return self._files[i]
        f = open(self.shards[i], "rb")  # noqa: SIM115 - kept open across samples, closed by close()
        self._files[i] = f
        while len(self._files) > self.keep_open:
            self._files.popitem(last=False)[1].close()
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def epoch_len(self, epoch: int) -> int:
        return len(self.sampler.items(epoch))

    def read(self, epoch: int, pos: int) -> Record | Skipped:
        """Position ``pos`` of ``epoch`` in this rank's stream, read and checked."""
        s, i = (int(x) for x in self.sampler.items(epoch)[pos])
        key, members = self._shard_index(s)[i]
        shard = self.shards[s]
        try:
            fields = read_members(self._file(s), members)
        except OSError as e:
            return Skipped(epoch, pos, shard, key, "unreadable shard", str(e))
        try:
            image, caption, hw = check_fields(fields, stage=self.stage, patch=self.patch,
                                              caption_field=self.caption_field)
        except BadImage as e:
            return Skipped(epoch, pos, shard, key, e.reason, e.detail)
        return Record(epoch, pos, shard, key, image, caption, hw)

    def stream(self, epoch: int = 0, pos: int = 0, epochs: int | None = None) -> Iterator[Record | Skipped]:
        """Items from cursor ``(epoch, pos)`` on, through ``epochs`` epochs in all (None = endless)."""
        while epochs is None or epoch < epochs:
            n = self.epoch_len(epoch)
            if n == 0 and epochs is None:
                raise ValueError(f"rank {self.sampler.rank} has no samples: {len(self.shards)} shards hold "
                                 f"{sum(self.sampler.counts)} samples for {self.sampler.num_readers} readers")
            while pos < n:
                yield self.read(epoch, pos)
                pos += 1
            epoch, pos = epoch + 1, 0
