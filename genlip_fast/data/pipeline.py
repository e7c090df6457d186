"""The training data loader: shards in, packed batches out, with a position that checkpoints save and restore.

::

    ShardReader ──records──▶ decoder (DALI: GPU or CPU; Pillow without DALI) ──▶ patchify ─┐
      (checks bytes,                                                                     ├─▶ Packer ─▶ queue ─▶ trainer
       skips bad ones)     tokenizer.encode_batch (Rust threads) ──────────────────────────┘
                           └──────────── one background thread, ``prefetch`` packs ahead ───────────┘

Where the tensors live: every field of a yielded :class:`PackedBatch` is a CPU tensor, except ``patches``, which is
already on the GPU when DALI decodes there (``loader.stats["backend"] == "dali-gpu"``); ``batch.to(device)`` moves
the rest (and leaves ``patches`` where it is).

The position (``state_dict()``) is the stream cursor just past the last sample the packer took, plus the samples the
packer still holds (by cursor) and its counters. Restoring re-reads and re-decodes only those held samples, then
continues from the cursor: the packs that follow are exactly those an uninterrupted run would have produced.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections.abc import Iterator

import torch

from .batch import PackedBatch, Sample
from .config import DataConfig
from .loader import HostDecoder
from .packing import Packer, SampleTooLongError, fit_sample
from .reader import Record, ShardReader, SkipCounter, Skipped
from .tokenizer import Tokenizer
from .transforms import check_grid_limits
from .webdataset import expand_shards

log = logging.getLogger(__name__)

STATE_VERSION = 1
_END = object()


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
    """Iterator of :class:`PackedBatch` for one rank; see the module doc for where tensors live and what the saved
    position holds.

    ``epochs=None`` streams forever (training); a number stops after that many passes (evaluation, tests).
    ``stats`` holds: ``backend``, ``packs``, ``samples``, ``skipped`` (by reason) and ``skipped_total``,
    ``truncated_captions``, ``fill_ratio`` (tokens in use over pack capacity of the packs delivered),
    ``images_per_s`` (decode + tokenise + pack rate of the background work, not counting time it waited for room in
    the queue), ``data_wait_s`` (total time ``next()`` waited) and ``last_wait_s``.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, *, rank: int = 0, world_size: int = 1,
                 epochs: int | None = None):
        if cfg.stage not in (1, 2):
            raise ValueError(f"data.stage must be 1 or 2, got {cfg.stage}")
        if cfg.stage == 1 and cfg.image_size % cfg.patch_size:
            raise ValueError(f"data.image_size {cfg.image_size} is not a multiple of the patch {cfg.patch_size}")
        if cfg.stage == 2:
            check_grid_limits(cfg.min_patches, cfg.max_patches)
        self.cfg, self.tokenizer, self.rank, self.world_size, self.epochs = cfg, tokenizer, rank, world_size, epochs
        self.kind, self.device_id = resolve_backend(cfg.backend)
        self.backend = "host" if self.kind == "host" else ("dali-gpu" if self.device_id is not None else "dali-cpu")
        self.reader = ShardReader(expand_shards(cfg.train_shards), seed=cfg.seed, rank=rank, world_size=world_size,
                                  num_workers=cfg.num_workers, stage=cfg.stage, patch=cfg.patch_size,
                                  caption_field=cfg.caption_field)
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

    # -- the trainer's interface ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        if self._gen is None and self._thread is None:
            self._start()
        t0 = time.perf_counter()
        item = self._q.get() if self._thread is not None else self._next_direct()
        dt = time.perf_counter() - t0
        self._wait["total"] += dt
        self._wait["last"] = dt
        if item is _END:
            self._thread, self._gen = None, iter(())
            raise StopIteration
        if isinstance(item, _Failure):
            raise RuntimeError("the data loader's background thread failed") from item.exc
        pack, state = item
        self._state = state
        self.skipped.counts = dict(state["skipped"])
        if pack is None:
            self._thread, self._gen = None, iter(())
            raise StopIteration
        d = self._delivered
        d["packs"] += 1
        d["tokens"] += int(pack.cu_seqlens[-1])
        d["samples"] += pack.num_samples
        return pack

    def state_dict(self) -> dict:
        """The stream position after the last pack handed out (plain ints, lists and strings)."""
        return {**self._state, "delivered": dict(self._delivered)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a loader on the same shards, seed, rank layout)."""
        self._shutdown()
        if "pos" not in state and "packs_yielded" in state:  # an older checkpoint: replay up to its position
            self._state = self._initial_state()
            for _ in range(int(state["packs_yielded"])):
                next(self)
            return
        for k in ("digest", "rank", "world_size"):
            if state.get(k) != self._state[k]:
                raise ValueError(f"the saved data position belongs to another layout ({k} {state.get(k)!r}, this "
                                 f"loader has {self._state[k]!r}): same shards, seed, world size and num_workers "
                                 "are needed to continue exactly")
        self._state = {k: v for k, v in state.items() if k != "delivered"}
        self._delivered = dict(state.get("delivered", self._delivered))
        self.skipped.counts = dict(state["skipped"])

    @property
    def stats(self) -> dict:
        d, w = self._delivered, self._work
        return {
            "backend": self.backend,
            "packs": d["packs"],
            "samples": d["samples"],
            "skipped": dict(self.skipped.counts),
            "skipped_total": self.skipped.total,
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
        return {"version": STATE_VERSION, "digest": self.reader.digest, "rank": self.rank,
                "world_size": self.world_size, "epoch": 0, "pos": 0, "closed": [], "open": [],
                "min_len": self.cfg.pack_tokens, "skipped": {}, "truncated": 0}

    def _start(self) -> None:
        self._stop = threading.Event()
        gen = self._produce(dict(self._state))
        if self.cfg.prefetch <= 0:
            self._gen = gen
            return
        self._q = queue.Queue(maxsize=self.cfg.prefetch)
        self._thread = threading.Thread(target=self._run, args=(gen, self._q, self._stop), daemon=True,
                                        name=f"genlip-data-rank{self.rank}")
        self._thread.start()

    def _next_direct(self):
        try:
            return next(self._gen)
        except StopIteration:
            return _END

    def _run(self, gen, q: queue.Queue, stop: threading.Event) -> None:
        try:
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

    def _shutdown(self) -> None:
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:  # unblock a producer waiting for room
                    self._q.get_nowait()
                except queue.Empty:
                    self._thread.join(0.05)
        self._thread, self._gen, self._q = None, None, None

    def _get_decoder(self):
        if self._decoder is None:
            c = self.cfg
            kw = dict(stage=c.stage, image_size=c.image_size, patch=c.patch_size, min_patches=c.min_patches,
                      max_patches=c.max_patches, num_threads=c.num_threads)
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

    def _produce(self, state: dict) -> Iterator[tuple[PackedBatch, dict]]:
        """Packs with the position just after each; runs on the background thread."""
        cfg, reader = self.cfg, self.reader
        packer = Packer(cfg.pack_tokens, lookahead=cfg.lookahead, truncate=cfg.truncate_captions)
        skipped = SkipCounter(counts=dict(state["skipped"]))
        counters = {"truncated": int(state["truncated"])}
        where: dict[int, tuple[int, int]] = {}  # id(sample held by the packer) -> its cursor

        # samples the packer held at the saved position: read and decode them again, rebuild the packer
        held = [(int(e), int(p)) for b in state["closed"] + state["open"] for e, p in b]
        if held:
            recs = [r for r in (reader.read(e, p) for e, p in held) if isinstance(r, Record)]
            again = self._samples(recs, SkipCounter(), {"truncated": 0})
            by_cursor = {(r.epoch, r.pos): fit_sample(s, cfg.pack_tokens, cfg.truncate_captions)
                         for r, s in zip(recs, again) if s is not None}
            if len(by_cursor) < len(held):
                log.warning("%d held samples could not be read again; the resumed stream differs from the saved one",
                            len(held) - len(by_cursor))

            def rebuild(bins):
                out = []
                for b in bins:
                    kept = [c for c in (tuple(c) for c in b) if c in by_cursor]
                    for c in kept:
                        where[id(by_cursor[c])] = c
                    out.append([by_cursor[c] for c in kept])
                return [b for b in out if b]

            packer.restore(rebuild(state["closed"]), rebuild(state["open"]), state["min_len"])

        def snapshot(epoch: int, pos: int) -> dict:
            closed, open_bins = packer.buffered()
            live = {id(s) for b in closed + open_bins for s in b}
            for k in [k for k in where if k not in live]:
                del where[k]
            return {**{k: v for k, v in state.items() if k not in ("closed", "open")},
                    "epoch": epoch, "pos": pos,
                    "closed": [[list(where[id(s)]) for s in b] for b in closed],
                    "open": [[list(where[id(s)]) for s in b] for b in open_bins],
                    "min_len": packer.min_len, "skipped": dict(skipped.counts), "truncated": counters["truncated"]}

        epoch, pos = int(state["epoch"]), int(state["pos"])
        for pack in packer.ready():
            yield pack, snapshot(epoch, pos)
        stream = reader.stream(epoch, pos, self.epochs)
        while True:
            t0 = time.perf_counter()
            chunk: list[Record | Skipped] = []
            n_rec = 0
            for item in stream:
                chunk.append(item)
                n_rec += isinstance(item, Record)
                if n_rec == cfg.batch_size:
                    break
            if not chunk:
                break
            records = [r for r in chunk if isinstance(r, Record)]
            samples = iter(self._samples(records, skipped, counters) if records else [])
            ready = []
            for item in chunk:
                cursor = (item.epoch, item.pos + 1)
                if isinstance(item, Skipped):
                    skipped.skip(item.reason, item.shard, item.key, item.detail)
                    continue
                s = next(samples)
                if s is None:
                    continue
                try:
                    s = packer.place(s)
                except SampleTooLongError as e:
                    skipped.skip("too long for a pack", item.shard, item.key, str(e))
                    continue
                where[id(s)] = (item.epoch, item.pos)
                for pack in packer.ready():
                    ready.append((pack, snapshot(*cursor)))
            self._work["images"] += len(records)
            self._work["busy_s"] += time.perf_counter() - t0
            yield from ready
        packer.close_all()
        for pack in packer.ready():
            yield pack, snapshot(epoch=self.epochs or 0, pos=0)
        yield None, snapshot(epoch=self.epochs or 0, pos=0)  # the end: its counts, without a pack


def build_data_loader(cfg: DataConfig, tokenizer: Tokenizer, *, rank: int = 0, world_size: int = 1,
                      epochs: int | None = None) -> PackedLoader:
    """The loader for one rank of ``world_size``; see :class:`PackedLoader`."""
    return PackedLoader(cfg, tokenizer, rank=rank, world_size=world_size, epochs=epochs)
