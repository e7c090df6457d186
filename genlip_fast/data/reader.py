"""Reading samples from indexed shards, checking them before any decoder sees them.

DALI treats a bad image as a critical error that leaves its pipeline unusable, so every record is checked here, on
the host, from its bytes: an image member of a supported format with a readable header and a complete file, a size
of at least one patch, and a non-empty caption where the source's caption rule (:mod:`~genlip_fast.data.captions`)
looks for it. A record that fails is skipped — never silently: it is counted by
reason and logged with its shard and key (the first few one by one, then a summary line now and then). A shard that
cannot be opened (not a readable tar, a Parquet file without images) is skipped as a whole, counted and logged with
its path and why.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from . import storage
from .captions import AUTO, CaptionRule, MissingCaption, parse_rule
from .storage import StorageSetupError
from .transforms import BadImage, probe_image, too_small
from .webdataset import SHARD_ERRORS, TarShard, load_index, shard_error

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
        """A shard that cannot be read (not a readable tar, a Parquet file without images, ...): its samples are
        skipped (logged once per path)."""
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


def check_fields(fields: dict[str, bytes | dict], *, stage: int, patch: int, rule: CaptionRule | None = None,
                 ) -> tuple[bytes, str, str | None, tuple[int, int]]:
    """``(image bytes, caption, prompt or None, (h, w))`` of a good record (``rule``: where the caption is; default
    ``auto``), or :class:`BadImage` whose ``reason`` says why not. ``fields["json"]`` is the member's bytes, or a
    dict already (a Parquet row's other columns)."""
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


def open_shard(path: str, *, image_column: str = "", cache=None):
    """The container of one shard, by its name: ``*.parquet`` -> :class:`~genlip_fast.data.parquet.ParquetShard`,
    anything else an indexed webdataset tar (:class:`~genlip_fast.data.webdataset.TarShard`). Both give ``len()``,
    ``key(i)``, ``fields(i)`` (``{ext: bytes, ...}``, safe from several threads) and ``close()``."""
    if path.lower().endswith(".parquet"):
        try:
            from .parquet import ParquetShard
        except ImportError as e:
            raise StorageSetupError(f"{path}: reading Parquet shards needs pyarrow: pip install "
                                   f"'genlip_fast[parquet]' ({e})") from None
        return ParquetShard(path, image_column=image_column, cache=cache)
    return TarShard(path, load_index(path))


class ShardReader:
    """Reads samples ``(shard index, sample index)`` of a list of shards as :class:`Record` / :class:`Skipped`.

    A shard (a webdataset tar with its index, or a Parquet file: :func:`open_shard`) is opened only when first
    reached — for its sample count when a stream opens it, or to read a record — and kept open for the few shards
    being read (LRU). So start-up reads no shard at all. A shard that cannot be opened (not a tar, a broken header,
    a Parquet file without images, unreadable) counts as empty: it is reported with its path to the ``skipped``
    counter. Local or remote (:mod:`~genlip_fast.data.storage`): a record is one read of its members' byte range;
    :meth:`read_ahead` fetches the next samples of a stream concurrently, which remote shards need to keep up.
    Every record's caption is found by ``caption`` (a rule); ``prompt`` (if not '') is every record's prompt, unless
    the rule takes one from the record's conversation. Several sources (:meth:`of_sources`) are read as one list of
    shards, each source's after the one before, each with its own rule and prompt.
    """

    def __init__(self, shards: list[str], *, stage: int = 1, patch: int = 16, caption: CaptionRule | None = None,
                 prompt: str = "", keep_open: int = 8, image_column: str = ""):
        self.shards = list(shards)
        self.stage, self.patch, self.keep_open = stage, patch, keep_open
        self.image_column = image_column
        self.starts = [0]
        """The index of each source's first shard."""
        self.rules, self.prompts = [caption or parse_rule(AUTO)], [prompt]
        self._open: OrderedDict[int, object] = OrderedDict()
        self._bad: dict[int, str] = {}
        self._cache = None  # Parquet row groups, shared by this reader's Parquet shards
        self._ahead: dict[tuple[int, int], Future] = {}
        self._pool: ThreadPoolExecutor | None = None

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

    def _shard(self, i: int):
        """The open container of shard ``i``, or None for a bad shard."""
        if i in self._bad:
            return None
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        path = self.shards[i]
        if self._cache is None and path.lower().endswith(".parquet"):
            from .parquet import RowGroupCache

            self._cache = RowGroupCache()
        try:
            shard = open_shard(path, image_column=self.image_column, cache=self._cache)
        except SHARD_ERRORS as e:
            self._bad[i] = shard_error(e, path)
            return None
        self._open[i] = shard
        while len(self._open) > self.keep_open:
            self._open.popitem(last=False)[1].close()
        return shard

    @property
    def bad_shards(self) -> dict[str, str]:
        """``{path: why}`` of the shards found unusable so far."""
        return {self.shards[i]: why for i, why in sorted(self._bad.items())}

    def count(self, i: int, skipped: SkipCounter | None = None) -> int:
        """Samples in shard ``i`` (opens it); 0 for a bad shard, which is reported to ``skipped``."""
        shard = self._shard(i)
        if shard is None and skipped is not None:
            skipped.bad_shard(self.shards[i], self._bad[i])
        return 0 if shard is None else len(shard)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._ahead.clear()
        for shard in self._open.values():
            shard.close()
        self._open.clear()

    def read(self, s: int, i: int) -> Record | Skipped:
        """Sample ``i`` of shard ``s``, read and checked."""
        shard, path, k = self._shard(s), self.shards[s], self.source_of(s)
        if shard is None:
            return Skipped((s, i), path, f"#{i}", "unreadable shard", self._bad[s], k)
        key = shard.key(i)
        pending = self._ahead.pop((s, i), None)
        try:
            fields = pending.result() if pending is not None else shard.fields(i)
            image, caption, prompt, hw = check_fields(fields, stage=self.stage, patch=self.patch, rule=self.rules[k])
        except OSError as e:
            return Skipped((s, i), path, key, "unreadable shard", str(e), k)
        except BadImage as e:
            return Skipped((s, i), path, key, e.reason, e.detail, k)
        return Record((s, i), path, key, image, caption, hw, prompt or self.prompts[k] or None, k)

    def read_ahead(self, sampler, depth: int, threads: int = 16):
        """``sampler`` as it is, or — when ``depth > 0`` and some shard is remote — wrapped so that the members of
        its next ``depth`` samples are being fetched (on ``threads`` threads) while the stream works on the current
        ones. The order, the positions and what :meth:`read` returns are the same either way. ``sampler``: a
        :class:`~genlip_fast.data.sampler.ShardSampler` or a :class:`~genlip_fast.data.mixture.MixtureSampler`."""
        if depth <= 0 or not any(storage.is_remote(p) for p in self.shards):
            return sampler
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, min(threads, depth)), thread_name_prefix="genlip-read-ahead")
        # a shard opened ahead must stay open until the stream reaches it
        self.keep_open = max(self.keep_open, 2 * sampler.open_shards + 4)
        return ReadAhead(sampler, self, depth)

    def _fetch_ahead(self, s: int, i: int) -> None:
        shard = self._shard(s)
        if shard is not None and (s, i) not in self._ahead:
            self._ahead[(s, i)] = self._pool.submit(shard.fields, i)

    def _drop_ahead(self) -> None:
        for f in self._ahead.values():
            f.cancel()
        self._ahead.clear()


class ReadAhead:
    """A sampler that also has its reader fetch the samples it will hand out next (see
    :meth:`ShardReader.read_ahead`). A second sampler on the same state runs ``depth`` draws ahead: the draws are
    counter-based, so it names exactly the samples the stream will ask for. Everything but iteration is the wrapped
    sampler's (``state_dict()`` included), so a saved position does not depend on the read-ahead."""

    def __init__(self, sampler, reader: ShardReader, depth: int):
        self.sampler, self.reader, self.depth = sampler, reader, depth
        self._sync()

    def _sync(self) -> None:
        # the scout opens shards without reporting bad ones: the stream reports them when it reaches them
        self._scout = self.sampler.clone(self.reader.count)
        self._next: deque[tuple[int, int]] = deque()
        self.reader._drop_ahead()
        self._fill()

    def _fill(self) -> None:
        while self._scout is not None and len(self._next) < self.depth:
            try:
                pair = next(self._scout)
            except Exception:  # noqa: BLE001 - the end, or an empty dataset: the stream itself will meet it
                self._scout = None
                return
            self._next.append(pair)
            self.reader._fetch_ahead(*pair)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, int]:
        pair = next(self.sampler)
        if self._next and self._next[0] == pair:
            self._next.popleft()
            self._fill()
        else:  # cannot happen with the same counts; start over from the stream's own position rather than guess
            self._sync()
        return pair

    def __getattr__(self, name):
        return getattr(self.sampler, name)
