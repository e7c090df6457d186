"""Reading samples from indexed shards, checking them before any decoder sees them.

DALI treats a bad image as a critical error that leaves its pipeline unusable, so every record is checked here, on
the host, from its bytes: an image member of a supported format with a readable header and a complete file, a size
of at least one patch, and a non-empty caption where the source's caption rule (:mod:`~genlip_fast.data.captions`)
looks for it. A record that fails is skipped — never silently: it is counted by
reason and logged with its shard and key (the first few one by one, then a summary line now and then). A shard that
is not a readable tar is skipped as a whole, counted and logged with its path.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from .captions import AUTO, CaptionRule, MissingCaption, parse_rule
from .transforms import BadImage, probe_image, too_small
from .webdataset import SHARD_ERRORS, load_index, read_members, shard_error

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
OTHER_IMAGE_EXTS = ("gif", "bmp", "tif", "tiff", "jp2", "avif", "heic", "ppm", "pgm")


SKIP_DETAILS = 20
"""Skipped samples logged one by one (per counter); after that, one summary line per ``SKIP_SUMMARY_EVERY``."""
SKIP_SUMMARY_EVERY = 1000


@dataclass
class SkipCounter:
    """Samples dropped for bad input, by reason, and shards that could not be read at all.

    Counts are exact. The first ``SKIP_DETAILS`` skipped samples are logged one by one with shard and key; after
    that a summary line every ``SKIP_SUMMARY_EVERY`` skips keeps a bad dataset from flooding the log. Every bad shard
    is logged with its path (once).
    """

    counts: dict[str, int] = field(default_factory=dict)
    bad_shards: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    """The first detail seen per reason (what was looked for, the decoder's message), for summaries."""

    def __post_init__(self):
        self._lock = threading.Lock()
        self._shown = 0

    def skip(self, reason: str, shard: str, key: str, detail: str = "") -> None:
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1
            if detail:
                self.details.setdefault(reason, detail)
            total, shown = self.total, self._shown
            self._shown += shown < SKIP_DETAILS
        if shown < SKIP_DETAILS:
            log.warning("skipping %s in %s: %s%s", key, shard, reason, f" ({detail})" if detail else "")
            if shown + 1 == SKIP_DETAILS:
                log.warning("%d samples skipped; further skips are counted and summarised every %d", total,
                            SKIP_SUMMARY_EVERY)
        elif total % SKIP_SUMMARY_EVERY == 0:
            log.warning("%d samples skipped so far: %s", total, dict(sorted(self.counts.items())))

    def bad_shard(self, path: str, reason: str) -> None:
        """A shard that is not a readable tar: its samples are skipped (logged once per path)."""
        with self._lock:
            if path in self.bad_shards:
                return
            self.bad_shards.append(path)
        log.warning("skipping shard %s: %s", path, reason)

    @property
    def total(self) -> int:
        """Samples skipped (bad shards are counted apart, in ``bad_shards``)."""
        return sum(self.counts.values())


@dataclass
class Record:
    """One checked sample: bytes the decoders can take and its caption text."""

    sid: tuple[int, int]
    """(shard index, sample index in the shard): the sample's identity in the stream's saved position."""
    shard: str
    key: str
    image: bytes
    caption: str
    hw: tuple[int, int]
    prompt: str | None = None
    """Text between image and caption that carries no loss (the source's prompt, or the conversation's user turn)."""
    source: int = 0
    """The index of the source (``[[data.sources]]``) the shard belongs to."""

    @property
    def name(self) -> str:
        return f"{self.shard}:{self.key}"


@dataclass
class Skipped:
    """A sample that failed its checks; counted (and logged) when the stream reaches it."""

    sid: tuple[int, int]
    shard: str
    key: str
    reason: str
    detail: str = ""
    source: int = 0


def check_fields(fields: dict[str, bytes], *, stage: int, patch: int, rule: CaptionRule | None = None,
                 ) -> tuple[bytes, str, str | None, tuple[int, int]]:
    """``(image bytes, caption, prompt or None, (h, w))`` of a good record (``rule``: where the caption is; default
    ``auto``), or :class:`BadImage` whose ``reason`` says why not."""
    ext = next((e for e in IMAGE_EXTS if e in fields), None)
    if ext is None:
        other = next((e for e in OTHER_IMAGE_EXTS if e in fields), None)
        raise BadImage("unsupported format", other) if other else BadImage("missing image")
    try:
        found = (rule or parse_rule(AUTO)).caption(fields)
    except MissingCaption as e:
        raise BadImage(e.reason, e.detail) from None
    image = fields[ext]
    _, h, w = probe_image(image)
    if too_small(h, w, stage=stage, patch=patch):
        raise BadImage("image smaller than a patch", f"{w}x{h}")
    return image, found.text, found.prompt, (h, w)


class ShardReader:
    """Reads samples ``(shard index, sample index)`` of a list of shards as :class:`Record` / :class:`Skipped`.

    A shard's index (its ``.idx`` sidecar, or a scan of its tar headers) is loaded only when the shard is first
    reached — for its sample count when a stream opens it, or to read a record — and kept for the few shards being
    read (LRU), as are open file handles. So start-up reads no shard at all. A shard that cannot be indexed (not a
    tar, a broken header, unreadable) counts as empty: it is reported with its path to the ``skipped`` counter.
    Every record's caption is found by ``caption`` (a rule); ``prompt`` (if not '') is every record's prompt, unless
    the rule takes one from the record's conversation. Several sources (:meth:`of_sources`) are read as one list of
    shards, each source's after the one before, each with its own rule and prompt.
    """

    def __init__(self, shards: list[str], *, stage: int = 1, patch: int = 16, caption: CaptionRule | None = None,
                 prompt: str = "", keep_open: int = 8):
        self.shards = list(shards)
        self.stage, self.patch, self.keep_open = stage, patch, keep_open
        self.starts = [0]
        """The index of each source's first shard."""
        self.rules, self.prompts = [caption or parse_rule(AUTO)], [prompt]
        self._index: OrderedDict[int, list] = OrderedDict()
        self._bad: dict[int, str] = {}
        self._files: OrderedDict[int, object] = OrderedDict()

    @classmethod
    def of_sources(cls, shards: Sequence[Sequence[str]], rules: Sequence[CaptionRule], prompts: Sequence[str],
                   **kw) -> ShardReader:
        """A reader of several sources: ``shards[k]``, ``rules[k]`` and ``prompts[k]`` are source ``k``'s."""
        reader = cls([s for part in shards for s in part], **kw)
        reader.starts = [sum(len(p) for p in shards[:k]) for k in range(len(shards))]
        reader.rules, reader.prompts = list(rules), list(prompts)
        return reader

    @property
    def sizes(self) -> list[int]:
        """Shards per source."""
        return [b - a for a, b in zip(self.starts, [*self.starts[1:], len(self.shards)])]

    def source_of(self, shard: int) -> int:
        """The source shard ``shard`` belongs to."""
        return bisect.bisect_right(self.starts, shard) - 1

    def _shard_index(self, i: int) -> list:
        if i in self._bad:
            return []
        if i in self._index:
            self._index.move_to_end(i)
            return self._index[i]
        try:
            idx = load_index(self.shards[i])
        except SHARD_ERRORS as e:
            self._bad[i] = shard_error(e)
            return []
        self._index[i] = idx
        while len(self._index) > self.keep_open:
            self._index.popitem(last=False)
        return idx

    def count(self, i: int, skipped: SkipCounter | None = None) -> int:
        """Samples in shard ``i`` (loads its index); 0 for a bad shard, which is reported to ``skipped``."""
        n = len(self._shard_index(i))
        if i in self._bad and skipped is not None:
            skipped.bad_shard(self.shards[i], self._bad[i])
        return n

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

    def read(self, s: int, i: int) -> Record | Skipped:
        """Sample ``i`` of shard ``s``, read and checked."""
        key, members = self._shard_index(s)[i]
        shard, k = self.shards[s], self.source_of(s)
        try:
            fields = read_members(self._file(s), members)
        except OSError as e:
            return Skipped((s, i), shard, key, "unreadable shard", str(e), k)
        try:
            image, caption, prompt, hw = check_fields(fields, stage=self.stage, patch=self.patch, rule=self.rules[k])
        except BadImage as e:
            return Skipped((s, i), shard, key, e.reason, e.detail, k)
        return Record((s, i), shard, key, image, caption, hw, prompt or self.prompts[k] or None, k)
