"""Stop requests: SIGTERM, SIGUSR1 and Ctrl-C end a run with a checkpoint; a second Ctrl-C ends it at once.

- SIGTERM (Slurm at the time limit or on preemption, ``scancel``, torchrun shutting its workers down) and SIGUSR1:
  the step in flight finishes on every rank (the ranks vote in each step's all-reduce, so a signal that reaches one
  rank stops them all), a checkpoint is written, and every rank exits with ``128 + signal`` — the same number on
  every rank, agreed by :meth:`StopSignals.agreed` when the ranks got different signals or only some got one.
- The first SIGINT (Ctrl-C) is treated like SIGTERM; a second one raises ``KeyboardInterrupt`` at once (no
  checkpoint for the step in flight; the last complete checkpoint is untouched).

Under torchrun the workers run in their own sessions, so a terminal's Ctrl-C and a signal sent to torchrun reach
them only through torchrun, which forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT (``--signals-to-handle`` in newer
torch adds others) and SIGKILLs the workers ``--shutdown-timeout`` seconds later (30 without that option).
"""

from __future__ import annotations

import logging
import os
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("genlip_fast.train")


class StopSignals:
    """Installs the handlers for a ``with`` block (main thread only) and records the first stop signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._interrupts = 0
        self._old = {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt("second Ctrl-C: stopping at once, without a checkpoint")
            if int(os.environ.get("RANK", "0")) == 0:
                log.warning("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)")
        if self.received is None:
            self.received = signum

    def agreed(self, device: torch.device) -> int | None:
        """The stop signal every rank reports: the highest number any rank received (all ranks call it)."""
        got = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(got, op=dist.ReduceOp.MAX)
        return int(got.item()) or None

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


__all__ = ["StopSignals"]
