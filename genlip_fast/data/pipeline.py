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
once and draws among them at random); with several sources (``[[data.sources]]``), :mod:`~genlip_fast.data.mixture`
picks each sample's source by weight and each source is such a sampler of its own (:mod:`~genlip_fast.data.stream`).
Nothing is read at start but the shard list: a shard's index is loaded when the stream reaches it. :meth:`PackedLoader.samples` hands out the same samples one by one, unpacked — how held-out
images are read for captioning, so there is one reader for training and evaluation.

The position (``state_dict()``) is the sampler's position just past the last sample the packer took (a few integers
per open shard, and the mixture's draw count), the samples the packer still holds (as (shard, sample) pairs) and its
counters, per source. Restoring re-reads and re-decodes only those held samples, then continues: the packs that
follow are exactly those an uninterrupted run would have produced. :meth:`PackedLoader.load_remapped` continues the positions of a different number of streams.

The background thread is a :class:`~genlip_fast.data.prefetch.Prefetcher`. On a GPU (``device`` given) it binds to
that device and packs are handed out in pinned host memory, so ``batch.to(device, non_blocking=True)`` copies
asynchronously.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import torch

from . import storage
from .batch import PackedBatch, Sample
from .config import DataConfig, data_sources
from .dali import resolve_backend
from .packing import Packer, SampleTooLongError, fit_sample
from .position import checked_position, initial_position, remapped_position, sum_counts
from .prefetch import END, Failure, Prefetcher
from .reader import Record, ShardReader, SkipCounter, Skipped
from .sampler import EmptyDatasetError, layout_digest
from .specs import expand_spec
from .stream import PassTally, SourceStream
from .tokenizer import Tokenizer
from .transforms import HostDecoder, check_grid_limits

log = logging.getLogger(__name__)

MAX_READS = 1024
"""Records read (good or bad) between two decode batches at most: bounds the memory and the time between two
checks for a pass without a usable sample, whatever the share of bad records."""


class PackedLoader:
    """Iterator of :class:`PackedBatch` for one data stream (``rank`` of ``world_size`` streams); see the module doc
    for where tensors live and what the saved position holds.

    ``epochs=None`` streams forever (training); a number stops after that many passes (evaluation, tests).
    ``device``: the GPU the packs go to (the loader thread binds to it and pins the packs); None on CPU.
    ``stats`` holds: ``backend``, ``packs``, ``samples``, ``skipped`` (by reason) and ``skipped_total``,
    ``bad_shards`` (shards that cannot be read), ``sources`` (per source name: its ``weight``, ``samples``
    delivered in packs, ``skipped`` by reason, ``skipped_total``, ``bad_shards``), ``truncated_captions``,
    ``fill_ratio`` (tokens in use over pack capacity of the packs delivered), ``images_per_s`` (decode + tokenise +
    pack rate of the background work, not counting time it waited for room in the queue), ``data_wait_s`` (total
    time ``next()`` waited) and ``last_wait_s``.

    A stream (or a source of it) that goes a whole pass without a usable sample (every record bad, skipped or too
    long for a pack) raises :class:`~genlip_fast.data.sampler.NoUsableSampleError` from ``next()``, naming the
    source, the shards and the skips by reason, instead of reading on forever (``epochs=None``; a finite loader
    just ends). ``interrupt``: a callable (None by default) that ``next()`` asks every
    :data:`~genlip_fast.data.prefetch.POLL_S` seconds while it waits for a pack; when it returns true, ``next()``
    raises :class:`~genlip_fast.data.prefetch.DataWaitInterrupted` (the trainer: a stop signal during a data wait).
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
        self.sources = data_sources(cfg)
        lists = [expand_spec(src.spec) for src in self.sources]
        self.reader = ShardReader.of_sources(lists, [src.rule for src in self.sources],
                                             [src.prompt for src in self.sources], stage=cfg.stage,
                                             patch=cfg.patch_size, keep_open=cfg.shuffle_shards + 4,
                                             image_column=cfg.image_column)
        # one source: the position of a single-dataset run (version 2 checkpoints continue); several: their bounds
        marks = [f"#source {len(x)}" for x in lists] if len(lists) > 1 else []
        self.digest = layout_digest(self.reader.shards + marks, cfg.seed)
        self._decoder = None
        self._state = self._initial_state()
        self._prefetch: Prefetcher | None = None  # the background thread (data.prefetch > 0)
        self._gen: Iterator | None = None  # or the packs made on the calling thread
        self._counters = [SkipCounter() for _ in self.sources]  # per source, as of the last pack handed out
        self._taken = [0] * len(self.sources)
        self._delivered = {"packs": 0, "tokens": 0, "samples": 0}
        self._wait = {"total": 0.0, "last": 0.0}
        self._work = {"images": 0, "busy_s": 0.0}
        self.interrupt: Callable[[], bool] | None = None

    # -- the trainer's interface ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        if self._gen is None and self._prefetch is None:
            self._start()
        t0 = time.perf_counter()
        if self._prefetch is not None:
            item = self._prefetch.get(self.interrupt, f"data stream {self.rank}: stopped waiting for a pack")
        else:
            item = next(self._gen, END)
        dt = time.perf_counter() - t0
        self._wait["total"] += dt
        self._wait["last"] = dt
        if item is END:
            self._prefetch, self._gen = None, iter(())
            raise StopIteration
        if isinstance(item, Failure):
            if isinstance(item.exc, EmptyDatasetError):
                raise item.exc
            raise RuntimeError("the data loader's background thread failed") from item.exc
        pack, state = item
        self._state = state
        self._sync_counts()
        if pack is None:
            self._prefetch, self._gen = None, iter(())
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
        stream = self._stream(self._state["sampler"], self._counters)
        for chunk in self._decoded(stream, {"truncated": 0}):
            for record, sample, position in chunk:
                stream.used(record.source, position)
                yield sample

    def state_dict(self) -> dict:
        """The stream position after the last pack handed out (plain ints, lists and strings)."""
        return {**self._state, "delivered": dict(self._delivered)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of the same stream of a loader on the same shards and
        seed, with the same number of streams)."""
        state = checked_position(state, self.digest)
        for k in ("stream", "streams"):
            if state[k] != self._state[k]:
                raise ValueError(f"the saved data position belongs to another layout ({k} {state[k]!r}, this loader "
                                 f"has {self._state[k]!r}): the same number of data streams is needed to continue "
                                 "exactly (load_remapped maps positions onto a different number)")
        self._shutdown()
        self._state = {k: v for k, v in state.items() if k != "delivered"}
        self._delivered = dict(state.get("delivered", self._delivered))
        self._sync_counts()
        old, now = state.get("weights"), [src.weight for src in self.sources]
        if old is not None and old != now:
            log.warning("data stream %d: the source weights changed since the checkpoint (%s -> %s); the mixture "
                        "continues with the new ones", self.rank, old, now)
        self._state["weights"] = now

    def load_remapped(self, states: dict[int, dict]) -> dict:
        """Continue the saved positions of *every* stream of another layout (``{stream: state}``, any number of
        streams) as this stream of this layout (:func:`~genlip_fast.data.position.remapped_position`): the old
        streams' open shards go on from their exact positions, and the samples their packers held are packed as
        they were held. No sample is skipped or read twice; the order of the draws and which samples share a pack
        differ from an uninterrupted run. Returns what was carried over: ``{"from_streams"`` (whose held samples),
        ``"lanes"`` (old open shards taken over), ``"held"}``."""
        old = [checked_position(states[t], self.digest) for t in sorted(states)]
        if sorted(states) != list(range(old[0]["streams"])):
            raise ValueError(f"load_remapped needs the positions of all {old[0]['streams']} saved streams, got "
                             f"{sorted(states)}")
        state, carried = remapped_position(old, stream=self.rank, streams=self.world_size, **self._layout())
        self.load_state_dict(state)
        mine = [st for t, st in enumerate(old) if t % self.world_size == self.rank]
        self._delivered = {k: sum(int(st.get("delivered", {}).get(k, 0)) for st in mine) for k in self._delivered}
        return carried

    def _layout(self) -> dict:
        """What a position of this loader is made of, besides its stream."""
        return dict(lanes_per_stream=self.cfg.shuffle_shards, seed=self.cfg.seed, pack_tokens=self.cfg.pack_tokens,
                    weights=[src.weight for src in self.sources], digest=self.digest)

    def _sync_counts(self) -> None:
        """The per-source counters from the position (``self._state``), as of its pack."""
        for c, src in zip(self._counters, self._state["sources"]):
            c.counts, c.bad_shards = dict(src["skipped"]), list(src["bad_shards"])
        self._taken = [int(src["taken"]) for src in self._state["sources"]]

    @property
    def stats(self) -> dict:
        d, w, counters = self._delivered, self._work, self._counters
        skipped = sum_counts(c.counts for c in counters)
        return {
            "backend": self.backend,
            "packs": d["packs"],
            "samples": d["samples"],
            "skipped": skipped,
            "skipped_total": sum(skipped.values()),
            "bad_shards": sum(len(c.bad_shards) for c in counters),
            "sources": {src.name: {"weight": src.weight, "samples": n, "skipped": dict(c.counts),
                                   "skipped_total": c.total, "bad_shards": len(c.bad_shards)}
                        for src, n, c in zip(self.sources, self._taken, counters)},
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
        return initial_position(stream=self.rank, streams=self.world_size, **self._layout())

    def _stream(self, position: dict, skipped: list[SkipCounter]) -> SourceStream:
        """This stream's samples from ``position`` on, its skips counted in ``skipped`` (one counter per source),
        with the reader fetching ahead of it (remote shards)."""
        stream = SourceStream(self.reader, [src.weight for src in self.sources], position, skipped,
                              seed=self.cfg.seed, epochs=self.epochs, describe=self._no_usable_sample,
                              options=[self._option(k) for k in range(len(self.sources))])
        stream.sampler = self.reader.read_ahead(stream.sampler, self.cfg.read_ahead)
        return stream

    def _start(self) -> None:
        gen = self._produce(dict(self._state))
        if self.cfg.prefetch <= 0:
            self._gen = gen
            return
        self._prefetch = Prefetcher(gen, self.cfg.prefetch, name=f"genlip-data-stream{self.rank}",
                                    device=self.device if self.pin else None)

    def _shutdown(self, timeout_s: float = 30.0) -> None:
        if self._prefetch is not None and not self._prefetch.close(timeout_s):
            log.warning("data stream %d: the loader thread did not stop within %.0f s; leaving it", self.rank,
                        timeout_s)
        self._prefetch, self._gen = None, None

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

    def _samples(self, records: list[Record], skipped: list[SkipCounter], counters: dict) -> list[Sample | None]:
        """Decode and tokenise ``records`` (one batch); ``None`` (counted in its source's ``skipped``) where a record
        failed to decode."""
        decoded = self._get_decoder()([r.image for r in records])
        ids = self.tokenizer.encode_batch([r.caption for r in records], add_eot=True)
        prompts = sorted({r.prompt for r in records if r.prompt})
        prompt_ids = dict(zip(prompts, self.tokenizer.encode_batch(prompts))) if prompts else {}
        cap = self.cfg.max_caption_tokens
        out: list[Sample | None] = []
        for r, d, t in zip(records, decoded, ids):
            if d is None:
                skipped[r.source].skip("undecodable image", r.shard, r.key)
                out.append(None)
                continue
            if cap and len(t) > cap:
                t = t[:cap - 1] + [self.tokenizer.eot_id]
                counters["truncated"] += 1
            prompt = torch.tensor(prompt_ids[r.prompt], dtype=torch.int64) if r.prompt else None
            out.append(Sample(d[0], d[1], torch.tensor(t, dtype=torch.int64), prompt, key=r.name))
        return out

    def _decoded(self, stream: SourceStream, counters: dict) -> Iterator[list[tuple[Record, Sample, dict]]]:
        """The stream's samples read, checked, decoded and tokenised, one decode batch (``data.batch_size`` good
        records, or fewer after ``MAX_READS`` records) at a time: ``(record, sample, sampler position just past it)``
        per good sample, in the sampler's order (the list may be empty). Bad records and failed decodes are skipped
        and counted in ``stream.skipped`` (per source). The caller tells ``stream`` which samples it used before it
        asks for the next batch; a whole pass of a source without one raises :class:`NoUsableSampleError` (endless
        streams; a finite one just ends). The one path from shards to samples: packs (:meth:`_produce`) and single
        samples (:meth:`samples`) both come from here."""
        reader, sampler, skipped = self.reader, stream.sampler, stream.skipped
        reader.keep_open = max(reader.keep_open, sampler.open_shards + 4)
        endless = sampler.epochs is None
        while True:
            if endless:
                stream.check()
            t0 = time.perf_counter()
            chunk: list[tuple[Record | Skipped, dict | None]] = []
            n_rec = 0
            try:
                for s, i in sampler:
                    if endless and not n_rec and stream.passed():
                        break  # a whole pass without a usable sample: the check above raises (this draw with it)
                    item = reader.read(s, i)
                    stream.read(s)
                    good = isinstance(item, Record)
                    chunk.append((item, sampler.state_dict() if good else None))
                    n_rec += good
                    if n_rec == self.cfg.batch_size or len(chunk) == MAX_READS:
                        break
            except EmptyDatasetError as e:
                k = stream.current
                bad = skipped[k].bad_shards
                err = EmptyDatasetError((f"source {self.sources[k].name!r}: " if len(self.sources) > 1 else "")
                                        + f"{e}" + (f": {len(bad)} cannot be read ({', '.join(bad[:5])}"
                                                    f"{' ...' if len(bad) > 5 else ''}; see the warnings above)"
                                                    if bad else ""))
                err.option = self._option(k)
                raise err from None
            if not chunk:
                if endless:
                    continue  # a pass ended at the first draw: the check raises
                return
            records = [r for r, _ in chunk if isinstance(r, Record)]
            samples = iter(self._samples(records, skipped, counters) if records else [])
            good = []
            for item, position in chunk:
                if isinstance(item, Skipped):
                    skipped[item.source].skip(item.reason, item.shard, item.key, item.detail)
                    continue
                s = next(samples)
                if s is not None:
                    good.append((item, s, position))
            self._work["images"] += len(records)
            self._work["busy_s"] += time.perf_counter() - t0
            yield good

    def _option(self, k: int) -> str:
        """The config option that names source ``k``'s shards."""
        return f"data.sources[{k}]" if self.cfg.sources else "data.train_shards"

    def _no_usable_sample(self, k: int, tally: PassTally) -> str:
        """The one-line account of a pass of source ``k`` without a usable sample (:meth:`PassTally.summary`)."""
        stream = f"data stream {self.rank} of {self.world_size}"
        if len(self.sources) > 1:
            where = f"source {self.sources[k].name!r}" + (f" of {stream}" if self.world_size > 1 else "")
        else:
            where = "the data" if self.world_size == 1 else stream
        own = self.cfg.sources and self.cfg.sources[k].caption
        return tally.summary(where, f"looked for {self.sources[k].rule.describe()}; "
                                    f"{f'{self._option(k)}.caption' if own else 'data.caption'} says where")

    def _produce(self, state: dict) -> Iterator[tuple[PackedBatch, dict]]:
        """Packs with the position just after each; runs on the background thread."""
        cfg, reader = self.cfg, self.reader
        packer = Packer(cfg.pack_tokens, lookahead=cfg.lookahead, truncate=cfg.truncate_captions)
        skipped = [SkipCounter(counts=dict(src["skipped"]), bad_shards=list(src["bad_shards"]))
                   for src in state["sources"]]
        taken = [int(src["taken"]) for src in state["sources"]]  # per source: samples handed out in packs
        counters = {"truncated": int(state["truncated"])}
        stream = self._stream(state["sampler"], skipped)
        sampler = stream.sampler
        where: dict[int, tuple[int, int]] = {}  # id(sample held by the packer) -> (shard, sample)

        # samples the packer held at the saved position: read and decode them again, rebuild the packer
        held = [(int(s), int(i)) for b in state["closed"] + state["open"] for s, i in b]
        if held:
            recs = [r for r in (reader.read(s, i) for s, i in held) if isinstance(r, Record)]
            again = self._samples(recs, [SkipCounter() for _ in skipped], {"truncated": 0})
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
            for k in [k for k in where if k not in live]:  # no longer held: handed out in a pack
                taken[reader.source_of(where[k][0])] += 1
                del where[k]
            return {**state, "sampler": position,
                    "closed": [[list(where[id(s)]) for s in b] for b in closed],
                    "open": [[list(where[id(s)]) for s in b] for b in open_bins],
                    "min_len": packer.min_len, "truncated": counters["truncated"],
                    "sources": [{"taken": n, "skipped": dict(c.counts), "bad_shards": list(c.bad_shards)}
                                for n, c in zip(taken, skipped)]}

        for pack in packer.ready():
            yield self._hand_out(pack), snapshot(sampler.state_dict())
        for chunk in self._decoded(stream, counters):
            t0 = time.perf_counter()
            ready = []
            for item, s, position in chunk:
                try:
                    s = packer.place(s)
                except SampleTooLongError as e:
                    skipped[item.source].skip("too long for a pack", item.shard, item.key, str(e))
                    continue
                stream.used(item.source, position)
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
