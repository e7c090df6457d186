"""Stop requests: SIGTERM, SIGUSR1, SIGUSR2 and Ctrl-C end a run with a checkpoint; a second Ctrl-C ends it at once.

- SIGTERM (Slurm at the time limit or on preemption, ``scancel``, torchrun shutting its workers down), SIGUSR1 and
  SIGUSR2 (Slurm's ``--signal=USR1@N`` setups): the step in flight finishes on every rank (the ranks vote in each
  step's all-reduce, so a signal that reaches one rank stops them all), a checkpoint is written, and every rank exits
  with ``128 + signal`` — the same number on every rank, agreed by :meth:`StopSignals.agreed` when the ranks got
  different signals or only some got one.
- The first SIGINT (Ctrl-C) is treated like SIGTERM; a second one raises ``KeyboardInterrupt`` at once (no
  checkpoint for the step in flight; the last complete checkpoint is untouched).

Under torchrun the workers run in their own sessions, so a terminal's Ctrl-C and a signal sent to torchrun reach
them only through torchrun, which forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT (``--signals-to-handle``, or the
``PET_SIGNALS_TO_HANDLE`` environment variable, adds SIGUSR1 and SIGUSR2) and SIGKILLs the workers
``--shutdown-timeout`` seconds later. Three more rules make a stop under torchrun clean whichever process the signal
reaches (``tests/test_faults_torchrun.py``):

- :func:`die_with_launcher`: a worker gets SIGTERM when its torchrun dies (Linux's parent-death signal), so a signal
  that kills torchrun (SIGUSR1 without that option) stops the workers with a checkpoint instead of leaving them
  training unsupervised;
- once its run has ended — a stop, the end, or an error every rank raises alike — a worker ignores stop signals
  until it exits (:meth:`StopSignals.__exit__`), so torchrun's SIGTERM to the ranks still finishing, sent as soon as
  the first rank exits with a non-zero status, does not turn theirs into -15;
- a stop is final: rank 0 records it in torchrun's store, and workers that torchrun restarts after it exit at once
  with the same status (:func:`genlip_fast.train.distributed.stop_recorded`); restarts still follow crashes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

import torch
import torch.distributed as dist

log = logging.getLogger("genlip_fast.train")

PR_SET_PDEATHSIG = 1


def under_torchrun() -> bool:
    """Whether this process is a worker started by torchrun's agent (its parent)."""
    return "TORCHELASTIC_RESTART_COUNT" in os.environ


def die_with_launcher() -> None:
    """Under torchrun, ask Linux for SIGTERM when the agent that started this worker dies (``PR_SET_PDEATHSIG``), and
    send it now if the agent is gone already. A stop signal like any other: once :class:`StopSignals` is installed
    the run ends after its step with a checkpoint; before, the process ends at once (nothing trained yet)."""
    if not under_torchrun() or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("could not ask for a parent-death signal (errno %d): this worker would outlive its torchrun",
                    ctypes.get_errno())
        return
    if parent == 1 or os.getppid() != parent:  # reparented: the agent died already
        os.kill(os.getpid(), signal.SIGTERM)


class StopSignals:
    """Installs the handlers for a ``with`` block (main thread only) and records the first stop signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

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
        # A torchrun worker is on its way out however the run ended (a stop, the end, an error every rank raises
        # alike), and torchrun SIGTERMs the ranks still finishing as soon as one exits with a non-zero status: it
        # ignores stop signals from here until it exits, so every rank keeps the status the run agreed on. Elsewhere
        # (in-process use) the old handlers come back.
        if under_torchrun():
            ignore_stop_signals()
        else:
            for s, h in self._old.items():
                signal.signal(s, h)


def ignore_stop_signals() -> None:
    """From now on this process ignores the stop signals (it is on its way out; main thread only)."""
    for s in StopSignals.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class RunStopped(Exception):
    """torchrun restarted the workers of a run that a stop signal had ended; ``code`` is the status the stop gave."""

    def __init__(self, code: int):
        super().__init__(f"a stop signal ended this run (exit {code}) and torchrun restarted its workers: a restart "
                         "does not resume a stopped run (rerun the command to continue from its checkpoint)")
        self.code = code


__all__ = ["RunStopped", "StopSignals", "die_with_launcher", "ignore_stop_signals", "under_torchrun"]
