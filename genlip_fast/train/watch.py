"""Hang reports: which rank a collective that does not finish waits for.

Every rank counts the sync points it enters (:func:`mark`, called by the collectives of
:mod:`~genlip_fast.train.distributed` and before each micro-step's forward) and the optimizer steps it finishes
(:func:`step_done`); a :class:`ProgressWatch` publishes them to torchrun's rendezvous store and, when this rank has
waited for 90% of ``parallel.collective_timeout_s``, logs which ranks are behind. :func:`describe_failure` words the
same report as the one line a timed-out or broken collective ends the run with (:class:`CollectiveError`).
"""

from __future__ import annotations

import logging
import threading
import time

import torch.distributed as dist

log = logging.getLogger(__name__)


class ProgressWatch:
    """Names the rank a hang waits for.

    Every rank counts the sync points it enters (the trainer's own collectives and each micro-step's forward, which
    runs FSDP's) and a daemon thread publishes the count to the rendezvous store; the end of each optimizer step is
    published at once (:meth:`step_done`), so a rank's published position is never more than one step old. When
    this rank has made no progress for 90% of the collective timeout — before the backend gives up (NCCL's watchdog
    then ends the process without returning to Python, so the report cannot wait for an exception) — it reads every
    rank's position and logs the ranks that are behind: they never reached the collective the others wait in. On
    gloo the collective then raises, and :func:`describe_failure` words the same report as the run's one-line error.
    """

    KEY = "genlip_progress/"
    REPORT_AT = 0.9

    def __init__(self, store: dist.Store, rank: int, world: int, timeout_s: float):
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, timeout_s
        self.poll_s = min(5.0, timeout_s / 10)
        self._state = (0, "start", time.monotonic(), time.time(), 0)  # replaced whole: the thread reads one state
        self._stop = threading.Event()
        self._publish(self._state)
        self._thread = threading.Thread(target=self._run, name="genlip-progress-watch", daemon=True)
        self._thread.start()

    def mark(self, label: str) -> None:
        """This rank enters sync point ``label`` (a collective every rank makes)."""
        self._state = (self._state[0] + 1, label, time.monotonic(), time.time(), self._state[4])

    def step_done(self, step: int) -> None:
        """This rank finished optimizer step ``step``: published now (one store write per step)."""
        count, label, mono, wall, _ = self._state
        self._state = state = (count, label, mono, wall, step)
        try:
            self._publish(state)
        except Exception as e:  # noqa: BLE001 - the store is gone: the watch thread stops on its own
            log.debug("progress not published: %s", e)

    def stop(self) -> None:
        """Stop and join the thread, so it is never inside a store call while the process group and store are torn
        down (a daemon thread in a C++ call at interpreter exit can abort the process)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.poll_s + 5)

    def _publish(self, state) -> None:
        count, label, _, wall, step = state
        self.store.set(f"{self.KEY}{self.rank}", f"{count} {wall:.3f} {step} {label}")

    def _run(self) -> None:
        published = reported = self._state[0]
        while not self._stop.wait(self.poll_s):
            state = self._state
            try:
                if state[0] != published:
                    self._publish(state)
                    published = state[0]
                stalled = time.monotonic() - state[2]
                if stalled >= self.REPORT_AT * self.timeout_s and reported != state[0]:
                    reported = state[0]
                    log.error(self.describe(stalled))
            except Exception as e:  # the store is gone (shutdown, a dead rank 0): nothing left to watch
                log.debug("progress watch stopped: %s", e)
                return

    def positions(self) -> dict[int, tuple[int, float, int, str]]:
        """Every rank's last published ``(sync points entered, wall time of the last one, last finished step, the
        sync point's label)``; this rank's own is its current one."""
        out = {}
        for r in range(self.world):
            key = f"{self.KEY}{r}"
            if r != self.rank and self.store.check([key]):
                count, wall, step, label = self.store.get(key).decode().split(" ", 3)
                out[r] = (int(count), float(wall), int(step), label)
        count, label, _, wall, step = self._state
        out[self.rank] = (count, wall, step, label)
        return out

    def describe(self, stalled: float, head: str | None = None) -> str:
        """One line: ``head`` (by default: no progress for ``stalled`` seconds), then the ranks behind, each with
        the last step it finished and the sync point it last entered, and where the others wait."""
        pos = self.positions()
        head = head or (f"rank {self.rank}: no progress for {stalled:.1f} s (parallel.collective_timeout_s = "
                        f"{self.timeout_s:g}; the collective fails at the timeout)")
        top = max(c for c, _, _, _ in pos.values())
        behind = sorted(r for r, (c, _, _, _) in pos.items() if c < top)
        missing = sorted(set(range(self.world)) - set(pos))
        ahead = [r for r, (c, _, _, _) in pos.items() if c == top]
        now = time.time()
        if not behind and not missing:
            return (f"{head}; every rank entered sync point #{top} ({pos[ahead[0]][3]}) and none has left it: an "
                    f"operation on all ranks is slower than the timeout (raise parallel.collective_timeout_s?)")
        parts = [f"rank {r} is behind: it last finished step {pos[r][2]} and entered sync point #{pos[r][0]} "
                 f"({pos[r][3]}) {now - pos[r][1]:.1f} s ago" for r in behind]
        parts += [f"rank {r} never reported" for r in missing]
        waits = "waits" if len(ahead) == 1 else "wait"
        return (f"{head}; {'; '.join(parts)}; {_ranks(ahead)} {waits} in sync point #{top} ({pos[ahead[0]][3]}, "
                f"after step {pos[ahead[0]][2]}) for {'it' if len(behind) + len(missing) == 1 else 'them'}")


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


_WATCH: ProgressWatch | None = None
"""This process's watch, while its process group is up under torchrun (:func:`start`)."""


def start(w: ProgressWatch | None) -> None:
    """Make ``w`` this process's watch (None: none), stopping the one before."""
    global _WATCH
    if _WATCH is not None:
        _WATCH.stop()
    _WATCH = w


def mark(label: str) -> None:
    """This rank enters sync point ``label``: a collective every rank makes (see :class:`ProgressWatch`)."""
    if _WATCH is not None:
        _WATCH.mark(label)


def step_done(step: int) -> None:
    """This rank finished optimizer step ``step`` (published to the other ranks' hang reports at once)."""
    if _WATCH is not None:
        _WATCH.step_done(step)


class CollectiveError(RuntimeError):
    """A collective failed (timed out, or lost a rank); the message names the ranks behind
    (:func:`describe_failure`)."""


def describe_failure(e: BaseException) -> str | None:
    """One line for a collective that failed under torchrun — timed out waiting, or lost a rank — naming the ranks
    behind and the last step each finished (:class:`ProgressWatch`); None for other errors and without a watch."""
    if _WATCH is None or not (isinstance(e, dist.DistError) or type(e) is RuntimeError):  # gloo: a RuntimeError
        return None
    text = str(e)
    timed_out = "timed out" in text.lower() or "timeout" in text.lower()
    lost = any(m in text for m in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))
    if not (timed_out or lost):
        return None
    what = (f"a collective timed out after parallel.collective_timeout_s = {_WATCH.timeout_s:g} s" if timed_out
            else "a collective lost its connection to another rank")
    try:
        return _WATCH.describe(0.0, head=f"rank {_WATCH.rank}: {what}")
    except Exception:  # noqa: BLE001 - the store went with the ranks: say what is known
        return f"rank {_WATCH.rank}: {what} (the other ranks' positions are not readable)"


__all__ = ["CollectiveError", "ProgressWatch", "describe_failure", "mark", "start", "step_done"]
