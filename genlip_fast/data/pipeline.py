"""The training data loader: shards in, packed batches out, with a position that checkpoints save and restore.

::

    ShardReader ──records──▶ decoder (DALI: GPU or CPU; Pillow without DALI) ──▶ patchify ─┐
      (checks bytes,                                                                     ├─▶ Packer ─▶ queue ─▶ trainer
       skips bad ones)     tokenizer.encode_batch (Rust threads) ──────────────────────────┘
                           └──────────── one background thread, ``prefetch`` packs ahead ───────────┘

Where the tensors live: every field of a yielded :class:`PackedBatch` is a CPU tensor, except ``patches``, which is
already on the GPU when DALI decodes there (``loader.stats["backend"] == "dali-gpu"``); ``batch.to(device)`` moves
the rest (and leaves ``patches`` where it is).

Which samples, in which order: :mod:`~genlip_fast.data.sampler` (each stream reads ``data.shuffle_shards`` shards at
once and draws among them at random). Nothing is read at start but the shard list: a shard's index is loaded when
the stream reaches it. :meth:`PackedLoader.samples` hands out the same samples one by one, unpacked — how held-out
images are read for captioning, so there is one reader for training and evaluation.

The position (``state_dict()``) is the sampler's position just past the last sample the packer took (a few integers
per open shard), the samples the packer still holds (as (shard, sample) pairs) and its counters. Restoring re-reads
and re-decodes only those held samples, then continues: the packs that follow are exactly those an uninterrupted run
would have produced. :meth:`PackedLoader.load_remapped` continues the positions of a different number of streams.

On a GPU (``device`` given) the background thread binds to that device and packs are handed out in pinned host
memory, so ``batch.to(device, non_blocking=True)`` copies asynchronously.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import torch

from . import storage
from .batch import PackedBatch, Sample
from .config import DataConfig
from .packing import Packer, SampleTooLongError, fit_sample
from .reader import Record, ShardReader, SkipCounter, Skipped
from .sampler import (
    EmptyDatasetError,
    NoUsableSampleError,
    PassWatch,
    ShardSampler,
    initial_state,
    layout_digest,
    remap_states,
)
from .tokenizer import Tokenizer
from .transforms import HostDecoder, check_grid_limits
from .webdataset import expand_shards

log = logging.getLogger(__name__)

STATE_VERSION = 2
_END = object()
MAX_READS = 1024
"""Records read (good or bad) between two decode batches at most: bounds the memory and the time between two
checks for a pass without a usable sample, whatever the share of bad records."""
POLL_S = 0.2
"""How often a wait for the next pack looks at :attr:`PackedLoader.interrupt`."""


class DataWaitInterrupted(RuntimeError):
    """``next(loader)`` gave up waiting for a pack because :attr:`PackedLoader.interrupt` said so; the stream has not
    moved and the next call waits again."""


class _PassTally:
    """What a stream read since its last usable sample, as counts (reasons, shard indices), and the check that no
    whole pass (:class:`~genlip_fast.data.sampler.PassWatch`) goes without one: :meth:`used` (per sample the caller
    takes) and :meth:`check` (between decode batches) raise :class:`NoUsableSampleError`, worded by ``describe``."""

    def __init__(self, sampler: ShardSampler, skipped: SkipCounter, reader: ShardReader,
                 describe: Callable[[_PassTally], str]):
        self.watch, self.skipped, self.reader, self.describe = PassWatch(sampler), skipped, reader, describe
        self.fresh = False
        self.failed: str | None = None
        self._restart()

    def _restart(self) -> None:
        self.counts, self.bad = dict(self.skipped.counts), len(self.skipped.bad_shards)
        self.shards: set[int] = set()
        self.size = 0

    def read(self, shard: int) -> None:
        """A record of ``shard`` was read (its index is loaded: counting it costs nothing)."""
        if shard not in self.shards:
            self.shards.add(shard)
            self.size += self.reader.count(shard)

    def used(self, position: dict) -> None:
        """The caller takes a sample; ``position``: the sampler's state just past it. A whole pass that ended since
        the sample taken before it (a stream whose share of an epoch had none) is raised by the next :meth:`check`,
        after what the caller made of the samples before it."""
        if self.watch.passed(position) and self.failed is None:
            self.failed = self.describe(self)
        self.watch.usable(position)
        self.fresh = True

    def check(self) -> None:
        """Between two decode batches: raise when a whole pass went by without a sample taken, or start counting
        afresh after one was."""
        if self.failed is None and not self.fresh and self.watch.passed():
            self.failed = self.describe(self)
        if self.failed is not None:
            raise NoUsableSampleError(self.failed)
        if self.fresh:
            self.fresh = False
            self._restart()

    def skips(self) -> dict[str, int]:
        """Skipped samples by reason since counting started afresh."""
        now = self.skipped.counts
        return {r: now[r] - self.counts.get(r, 0) for r in now if now[r] > self.counts.get(r, 0)}


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def resolve_backend(name: str) -> tuple[str, int | None]:
    """``(kind, device_id)``: ``("dali", 0)`` on a GPU, ``("dali", None)`` for DALI's CPU mode, ``("host", None)``."""
    from .dali import dali_available, gpu_count

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


class PackedLoader:
    """Iterator of :class:`PackedBatch` for one data stream (``rank`` of ``world_size`` streams); see the module doc
    for where tensors live and what the saved position holds.

    ``epochs=None`` streams forever (training); a number stops after that many passes (evaluation, tests).
    ``device``: the GPU the packs go to (the loader thread binds to it and pins the packs); None on CPU.
    ``stats`` holds: ``backend``, ``packs``, ``samples``, ``skipped`` (by reason) and ``skipped_total``,
    ``bad_shards`` (shards that are not a readable tar), ``truncated_captions``, ``fill_ratio`` (tokens in use over
    pack capacity of the packs delivered), ``images_per_s`` (decode + tokenise + pack rate of the background work,
    not counting time it waited for room in the queue), ``data_wait_s`` (total time ``next()`` waited) and
    ``last_wait_s``.

    A stream that goes a whole pass without a usable sample (every record bad, skipped or too long for a pack)
    raises :class:`~genlip_fast.data.sampler.NoUsableSampleError` from ``next()``, naming the shards and the skips
    by reason, instead of reading on forever (``epochs=None``; a finite loader just ends). ``interrupt``: a
    callable (None by default) that ``next()`` asks every ``POLL_S`` seconds while it waits for a pack; when it
    returns true, ``next()`` raises :class:`DataWaitInterrupted` (the trainer: a stop signal during a data wait).
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, *, rank: int = 0, world_size: int = 1,
                 epochs: int | None = None, device: torch.device | str | None = None):
        if cfg.stage not in (1, 2):
            raise ValueError(f"data.stage must be 1 or 2, got {cfg.stage}")
        if cfg.stage == 1 and cfg.image_size % cfg.patch_size:
            raise ValueError(f"data.image_size {cfg.image_size} is not a multiple of the patch {cfg.patch_size}")
        if cfg.stage == 2:
            check_grid_limits(cfg.min_patches, cfg.max_patches)
        if cfg.shuffle_shards < 1:
            raise ValueError(f"data.shuffle_shards must be >= 1, got {cfg.shuffle_shards}")
        self.cfg, self.tokenizer, self.rank, self.world_size, self.epochs = cfg, tokenizer, rank, world_size, epochs
        self.device = torch.device(device) if device is not None else None
        self.pin = self.device is not None and self.device.type == "cuda"
        self.kind, self.device_id = resolve_backend(cfg.backend)
        self.backend = "host" if self.kind == "host" else ("dali-gpu" if self.device_id is not None else "dali-cpu")
        storage.configure(cfg.storage_options)
        shards = expand_shards(cfg.train_shards)
        self.reader = ShardReader(shards, stage=cfg.stage, patch=cfg.patch_size, caption_field=cfg.caption_field,
                                  keep_open=cfg.shuffle_shards + 4, image_column=cfg.image_column)
        self.digest = layout_digest(shards, cfg.seed)
        self._decoder = None
        self._state = self._initial_state()
        self._thread: threading.Thread | None = None
        self._gen: Iterator | None = None
        self._q: queue.Queue | None = None
        self._stop = threading.Event()
        self.skipped = SkipCounter()
        self._delivered = {"packs": 0, "tokens": 0, "samples": 0}
        self._wait = {"total": 0.0, "last": 0.0}
        self._work = {"images": 0, "busy_s": 0.0}
        self.interrupt: Callable[[], bool] | None = None

    # -- the trainer's interface ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        if self._gen is None and self._thread is None:
            self._start()
        t0 = time.perf_counter()
        item = self._get() if self._thread is not None else self._next_direct()
        dt = time.perf_counter() - t0
        self._wait["total"] += dt
        self._wait["last"] = dt
        if item is _END:
            self._thread, self._gen = None, iter(())
            raise StopIteration
        if isinstance(item, _Failure):
            if isinstance(item.exc, EmptyDatasetError):
                raise item.exc
            raise RuntimeError("the data loader's background thread failed") from item.exc
        pack, state = item
        self._state = state
        self.skipped.counts, self.skipped.bad_shards = dict(state["skipped"]), list(state["bad_shards"])
        if pack is None:
            self._thread, self._gen = None, iter(())
            raise StopIteration
        d = self._delivered
        d["packs"] += 1
        d["tokens"] += int(pack.cu_seqlens[-1])
        d["samples"] += pack.num_samples
        return pack

    def samples(self) -> Iterator[Sample]:
        """This stream's samples one at a time, unpacked: read, checked, decoded and tokenised exactly as for its
        packs and in the order its packer takes them (the seeded order of :mod:`~genlip_fast.data.sampler`), from
        the loader's current position, which does not move. For held-out data read sample by sample (captioning):
        build the loader with ``epochs=1`` for one pass (``epochs=None`` never ends). Bad records and unreadable
        shards are skipped and counted in :attr:`stats`, as for packs. Runs on the calling thread."""
        reader, counters = self.reader, {"truncated": 0}
        sampler = self._sampler(self._state["sampler"], self.skipped)
        tally = _PassTally(sampler, self.skipped, reader, self._no_usable_sample)
        for chunk in self._decoded(sampler, tally, counters):
            for _, sample, position in chunk:
                tally.used(position)
                yield sample

    def state_dict(self) -> dict:
        """The stream position after the last pack handed out (plain ints, lists and strings)."""
        return {**self._state, "delivered": dict(self._delivered)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of the same stream of a loader on the same shards and
        seed, with the same number of streams)."""
        self._check_saved(state)
        for k in ("stream", "streams"):
            if state[k] != self._state[k]:
                raise ValueError(f"the saved data position belongs to another layout ({k} {state[k]!r}, this loader "
                                 f"has {self._state[k]!r}): the same number of data streams is needed to continue "
                                 "exactly (load_remapped maps positions onto a different number)")
        self._shutdown()
        self._state = {k: v for k, v in state.items() if k != "delivered"}
        self._delivered = dict(state.get("delivered", self._delivered))
        self.skipped.counts, self.skipped.bad_shards = dict(state["skipped"]), list(state["bad_shards"])

    def load_remapped(self, states: dict[int, dict]) -> dict:
        """Continue the saved positions of *every* stream of another layout (``{stream: state}``, any number of
        streams) as this stream of this layout (:func:`~genlip_fast.data.sampler.remap_states`): the old streams'
        open shards are dealt to the new streams in turn and go on from their exact positions, and the samples old
        stream ``t``'s packer held go to new stream ``t % streams``, packed as they were held (an old packer's open
        pack is closed when two meet). No sample is skipped or read twice; the order of the draws and which samples
        share a pack differ from an uninterrupted run. Returns what was carried over: ``{"from_streams"`` (whose
        held samples), ``"lanes"`` (old open shards taken over), ``"held"}``."""
        old = [states[t] for t in sorted(states)]
        for st in old:
            self._check_saved(st)
        if sorted(states) != list(range(old[0]["streams"])):
            raise ValueError(f"load_remapped needs the positions of all {old[0]['streams']} saved streams, got "
                             f"{sorted(states)}")
        sampler = remap_states([st["sampler"] for st in old], stream=self.rank, streams=self.world_size,
                               lanes_per_stream=self.cfg.shuffle_shards, seed=self.cfg.seed)
        mine = [st for t, st in enumerate(old) if t % self.world_size == self.rank]
        opened = [b for st in mine for b in st["open"] if b]
        closed = [b for st in mine for b in st["closed"]] + opened[:-1]
        state = {**self._initial_state(), "sampler": sampler, "closed": closed, "open": opened[-1:],
                 "min_len": min([self.cfg.pack_tokens] + [int(st["min_len"]) for st in mine]),
                 "truncated": sum(int(st["truncated"]) for st in mine),
                 "bad_shards": sorted({p for st in old for p in st["bad_shards"]})}
        for st in mine:
            for reason, n in st["skipped"].items():
                state["skipped"][reason] = state["skipped"].get(reason, 0) + int(n)
        self.load_state_dict(state)
        self._delivered = {k: sum(int(st.get("delivered", {}).get(k, 0)) for st in mine) for k in self._delivered}
        return {"from_streams": [t for t in range(len(old)) if t % self.world_size == self.rank],
                "lanes": len(sampler["lanes"]) - self.cfg.shuffle_shards,
                "held": sum(len(b) for b in closed + opened[-1:])}

    def _check_saved(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"the saved data position has format version {state.get('version')!r}; this loader "
                             f"reads version {STATE_VERSION} (streams that read several shards at once). A data "
                             "position written before that cannot be continued: start a new run from the "
                             "checkpoint's weights (checkpoint.init_from) instead")
        if state["digest"] != self.digest:
            raise ValueError(f"the saved data position belongs to another dataset (digest {state['digest']!r}, "
                             f"this loader has {self.digest!r}): the same shards (paths, in order) and data.seed "
                             "are needed to continue")

    @property
    def stats(self) -> dict:
        d, w = self._delivered, self._work
        return {
            "backend": self.backend,
            "packs": d["packs"],
            "samples": d["samples"],
            "skipped": dict(self.skipped.counts),
            "skipped_total": self.skipped.total,
            "bad_shards": len(self.skipped.bad_shards),
            "truncated_captions": self._state["truncated"],
            "fill_ratio": d["tokens"] / max(1, d["packs"] * self.cfg.pack_tokens),
            "images_per_s": w["images"] / w["busy_s"] if w["busy_s"] > 0 else 0.0,
            "data_wait_s": self._wait["total"],
            "last_wait_s": self._wait["last"],
        }

    def close(self) -> None:
        self._shutdown()
        self.reader.close()

    def __del__(self):
        try:
            self._shutdown()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- the work -------------------------------------------------------------------------------------------
    def _initial_state(self) -> dict:
        sampler = initial_state(seed=self.cfg.seed, stream=self.rank, streams=self.world_size,
                                lanes_per_stream=self.cfg.shuffle_shards)
        return {"version": STATE_VERSION, "digest": self.digest, "stream": self.rank, "streams": self.world_size,
                "sampler": sampler, "closed": [], "open": [], "min_len": self.cfg.pack_tokens, "skipped": {},
                "bad_shards": [], "truncated": 0}

    def _start(self) -> None:
        self._stop = threading.Event()
        gen = self._produce(dict(self._state))
        if self.cfg.prefetch <= 0:
            self._gen = gen
            return
        self._q = queue.Queue(maxsize=self.cfg.prefetch)
        self._thread = threading.Thread(target=self._run, args=(gen, self._q, self._stop), daemon=True,
                                        name=f"genlip-data-stream{self.rank}")
        self._thread.start()

    def _get(self):
        while True:
            try:
                return self._q.get(timeout=POLL_S)
            except queue.Empty:
                if self.interrupt is not None and self.interrupt():
                    raise DataWaitInterrupted(f"data stream {self.rank}: stopped waiting for a pack") from None

    def _next_direct(self):
        try:
            return next(self._gen)
        except StopIteration:
            return _END

    def _run(self, gen, q: queue.Queue, stop: threading.Event) -> None:
        try:
            if self.pin:  # pinned buffers and DALI's GPU work belong to this rank's device, not to GPU 0
                torch.cuda.set_device(self.device)
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            q.put(_Failure(e))

    def _shutdown(self, timeout_s: float = 30.0) -> None:
        if self._thread is not None:
            self._stop.set()
            deadline = time.monotonic() + timeout_s
            while self._thread.is_alive() and time.monotonic() < deadline:
                try:  # unblock a producer waiting for room
                    self._q.get_nowait()
                except queue.Empty:
                    self._thread.join(0.05)
            if self._thread.is_alive():  # stuck in a read (storage that hangs): a daemon, it ends with the process
                log.warning("data stream %d: the loader thread did not stop within %.0f s; leaving it", self.rank,
                            timeout_s)
        self._thread, self._gen, self._q = None, None, None

    def _sampler(self, position: dict, skipped: SkipCounter) -> ShardSampler:
        """This stream's sampler from ``position``, with the reader fetching ahead of it (remote shards)."""
        reader = self.reader
        sampler = ShardSampler(len(reader.shards), functools.partial(reader.count, skipped=skipped), position,
                               seed=self.cfg.seed, epochs=self.epochs)
        return reader.read_ahead(sampler, self.cfg.read_ahead)

    def _get_decoder(self):
        if self._decoder is None:
            c = self.cfg
            kw = dict(stage=c.stage, image_size=c.image_size, patch=c.patch_size, min_patches=c.min_patches,
                      max_patches=c.max_patches, pixel_norm=c.pixel_norm, num_threads=c.num_threads)
            if self.kind == "dali":
                from .dali import DaliDecoder

                self._decoder = DaliDecoder(batch_size=c.batch_size, device_id=self.device_id, **kw)
            else:
                self._decoder = HostDecoder(**kw)
        return self._decoder

    def _samples(self, records: list[Record], skipped: SkipCounter, counters: dict) -> list[Sample | None]:
        """Decode and tokenise ``records`` (one batch); ``None`` (counted) where a record failed to decode."""
        decoded = self._get_decoder()([r.image for r in records])
        ids = self.tokenizer.encode_batch([r.caption for r in records], add_eot=True)
        cap = self.cfg.max_caption_tokens
        out: list[Sample | None] = []
        for r, d, t in zip(records, decoded, ids):
            if d is None:
                skipped.skip("undecodable image", r.shard, r.key)
                out.append(None)
                continue
            if cap and len(t) > cap:
                t = t[:cap - 1] + [self.tokenizer.eot_id]
                counters["truncated"] += 1
            out.append(Sample(d[0], d[1], torch.tensor(t, dtype=torch.int64), key=r.name))
        return out

    def _decoded(self, sampler: ShardSampler, tally: _PassTally,
                 counters: dict) -> Iterator[list[tuple[Record, Sample, dict]]]:
        """The sampler's samples read, checked, decoded and tokenised, one decode batch (``data.batch_size`` good
        records, or fewer after ``MAX_READS`` records) at a time: ``(record, sample, sampler position just past it)``
        per good sample, in the sampler's order (the list may be empty). Bad records and failed decodes are skipped
        and counted in ``tally.skipped``. The caller tells ``tally`` which samples it used before it asks for the
        next batch; a whole pass without one raises :class:`NoUsableSampleError` (endless streams; a finite one
        just ends). The one path from shards to samples: packs (:meth:`_produce`) and single samples
        (:meth:`samples`) both come from here."""
        reader, skipped = self.reader, tally.skipped
        reader.keep_open = max(reader.keep_open, sampler.open_shards + 4)
        endless = sampler.epochs is None
        while True:
            if endless:
                tally.check()
            t0 = time.perf_counter()
            chunk: list[tuple[Record | Skipped, dict | None]] = []
            n_rec = 0
            try:
                for s, i in sampler:
                    if endless and not n_rec and tally.watch.passed():
                        break  # a whole pass without a usable sample: the check above raises (this draw with it)
                    item = reader.read(s, i)
                    tally.read(s)
                    good = isinstance(item, Record)
                    chunk.append((item, sampler.state_dict() if good else None))
                    n_rec += good
                    if n_rec == self.cfg.batch_size or len(chunk) == MAX_READS:
                        break
            except EmptyDatasetError as e:
                bad = skipped.bad_shards
                raise EmptyDatasetError(f"{e}" + (f": {len(bad)} are not readable tars ({', '.join(bad[:5])}"
                                                  f"{' ...' if len(bad) > 5 else ''}; see the warnings above)"
                                                  if bad else "")) from None
            if not chunk:
                if endless:
                    continue  # a pass ended at the first draw: the check raises
                return
            records = [r for r, _ in chunk if isinstance(r, Record)]
            samples = iter(self._samples(records, skipped, counters) if records else [])
            good = []
            for item, position in chunk:
                if isinstance(item, Skipped):
                    skipped.skip(item.reason, item.shard, item.key, item.detail)
                    continue
                s = next(samples)
                if s is not None:
                    good.append((item, s, position))
            self._work["images"] += len(records)
            self._work["busy_s"] += time.perf_counter() - t0
            yield good

    def _no_usable_sample(self, tally: _PassTally) -> str:
        """The one-line account of a pass without a usable sample: the shards, the records read, why each was
        skipped (a record read twice in the pass, as lanes that finish first go on, counts twice)."""
        skips = tally.skips()
        shards = [self.reader.shards[i] for i in sorted(tally.shards)]
        reasons = []
        for reason, n in sorted(skips.items(), key=lambda kv: -kv[1]):
            detail = tally.skipped.details.get(reason, "")
            if reason == "missing caption":
                detail = ("looked for the .txt member; data.caption_field names a .json field instead"
                          if not self.cfg.caption_field else f"looked for the .json field {self.cfg.caption_field!r}")
            reasons.append(f"{n} {reason}" + (f" ({detail[:80]})" if detail else ""))
        bad = tally.skipped.bad_shards[tally.bad:]
        if bad:
            reasons.append(f"{len(bad)} shard{'s' * (len(bad) != 1)} not a readable tar ({', '.join(bad[:3])}"
                           f"{' ...' if len(bad) > 3 else ''})")
        where = "the data" if self.world_size == 1 else f"data stream {self.rank} of {self.world_size}"
        listed = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
        return (f"no usable sample in a whole pass over {where}: {len(shards)} shard{'s' * (len(shards) != 1)} "
                f"of {tally.size} samples" + (f" ({listed})" if shards else "")
                + f", {sum(skips.values())} records read: " + ", ".join(reasons or ["none"]))

    def _produce(self, state: dict) -> Iterator[tuple[PackedBatch, dict]]:
        """Packs with the position just after each; runs on the background thread."""
        cfg, reader = self.cfg, self.reader
        packer = Packer(cfg.pack_tokens, lookahead=cfg.lookahead, truncate=cfg.truncate_captions)
        skipped = SkipCounter(counts=dict(state["skipped"]), bad_shards=list(state["bad_shards"]))
        counters = {"truncated": int(state["truncated"])}
        sampler = self._sampler(state["sampler"], skipped)
        where: dict[int, tuple[int, int]] = {}  # id(sample held by the packer) -> (shard, sample)

        # samples the packer held at the saved position: read and decode them again, rebuild the packer
        held = [(int(s), int(i)) for b in state["closed"] + state["open"] for s, i in b]
        if held:
            recs = [r for r in (reader.read(s, i) for s, i in held) if isinstance(r, Record)]
            again = self._samples(recs, SkipCounter(), {"truncated": 0})
            by_id = {r.sid: fit_sample(s, cfg.pack_tokens, cfg.truncate_captions)
                     for r, s in zip(recs, again) if s is not None}
            if len(by_id) < len(held):
                log.warning("%d held samples could not be read again; the resumed stream differs from the saved one",
                            len(held) - len(by_id))

            def rebuild(bins):
                out = []
                for b in bins:
                    kept = [c for c in (tuple(c) for c in b) if c in by_id]
                    for c in kept:
                        where[id(by_id[c])] = c
                    out.append([by_id[c] for c in kept])
                return [b for b in out if b]

            packer.restore(rebuild(state["closed"]), rebuild(state["open"]), state["min_len"])

        def snapshot(position: dict) -> dict:
            closed, open_bins = packer.buffered()
            live = {id(s) for b in closed + open_bins for s in b}
            for k in [k for k in where if k not in live]:
                del where[k]
            return {**state, "sampler": position,
                    "closed": [[list(where[id(s)]) for s in b] for b in closed],
                    "open": [[list(where[id(s)]) for s in b] for b in open_bins],
                    "min_len": packer.min_len, "skipped": dict(skipped.counts),
                    "bad_shards": list(skipped.bad_shards), "truncated": counters["truncated"]}

        for pack in packer.ready():
            yield self._hand_out(pack), snapshot(sampler.state_dict())
        tally = _PassTally(sampler, skipped, reader, self._no_usable_sample)
        for chunk in self._decoded(sampler, tally, counters):
            t0 = time.perf_counter()
            ready = []
            for item, s, position in chunk:
                try:
                    s = packer.place(s)
                except SampleTooLongError as e:
                    skipped.skip("too long for a pack", item.shard, item.key, str(e))
                    continue
                tally.used(position)
                where[id(s)] = item.sid
                for pack in packer.ready():
                    ready.append((self._hand_out(pack), snapshot(position)))
            self._work["busy_s"] += time.perf_counter() - t0
            yield from ready
        packer.close_all()
        for pack in packer.ready():
            yield self._hand_out(pack), snapshot(sampler.state_dict())
        yield None, snapshot(sampler.state_dict())  # the end: its counts, without a pack

    def _hand_out(self, pack: PackedBatch) -> PackedBatch:
        return pack.pin_memory() if self.pin else pack


def build_data_loader(cfg: DataConfig, tokenizer: Tokenizer, *, rank: int = 0, world_size: int = 1,
                      epochs: int | None = None, device: torch.device | str | None = None) -> PackedLoader:
    """The loader of data stream ``rank`` of ``world_size``; see :class:`PackedLoader`."""
    return PackedLoader(cfg, tokenizer, rank=rank, world_size=world_size, epochs=epochs, device=device)
