"""A generator run ahead on a background thread: the loader makes its next packs while the trainer steps.

::

    p = Prefetcher(gen, depth, name=...)   # a daemon thread puts gen's items into a queue of ``depth``
    p.get(interrupt)                       # the next item; END after the last; a Failure for what gen raised
    p.close()                              # stops the thread (False when it is stuck in a read that never returns)

A wait for an item can be cut short: ``get`` asks ``interrupt()`` every ``POLL_S`` seconds and raises
:class:`DataWaitInterrupted` when it returns true; nothing is taken from the queue or the generator, so the next
``get`` waits again for the same item.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import torch

END = object()
"""What :meth:`Prefetcher.get` returns after the generator's last item."""
POLL_S = 0.2
"""How often a wait for the next item asks its ``interrupt``."""


class DataWaitInterrupted(RuntimeError):
    """``next(loader)`` gave up waiting for a pack because :attr:`PackedLoader.interrupt` said so; the stream has not
    moved and the next call waits again."""


class Failure:
    """What the generator raised on the background thread, handed to the consumer (who raises it)."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher:
    """Runs ``gen`` on a daemon thread, up to ``depth`` items ahead of :meth:`get`. ``device``: a CUDA device the
    thread binds to first (pinned buffers and DALI's GPU work belong to that device, not to GPU 0)."""

    def __init__(self, gen: Iterator, depth: int, *, name: str, device: torch.device | None = None):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(gen, device), daemon=True, name=name)
        self._thread.start()

    def get(self, interrupt: Callable[[], bool] | None = None, why: str = "stopped waiting"):
        """The next item (:data:`END` after the last, a :class:`Failure` for what the generator raised); waits,
        asking ``interrupt()`` every ``POLL_S`` seconds, and raises ``DataWaitInterrupted(why)`` when it says so."""
        while True:
            try:
                return self.q.get(timeout=POLL_S)
            except queue.Empty:
                if interrupt is not None and interrupt():
                    raise DataWaitInterrupted(why) from None

    def _run(self, gen: Iterator, device: torch.device | None) -> None:
        q, stop = self.q, self._stop
        try:
            if device is not None:
                torch.cuda.set_device(device)
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            q.put(Failure(e))

    def close(self, timeout_s: float = 30.0) -> bool:
        """Stop the thread and wait up to ``timeout_s`` for it to end; False when it did not (stuck in a read of
        storage that hangs: a daemon, it ends with the process)."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:  # unblock a producer waiting for room
                self.q.get_nowait()
            except queue.Empty:
                self._thread.join(0.05)
        return not self._thread.is_alive()
