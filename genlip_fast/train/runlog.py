"""The run's log file, one per rank: ``out_dir/logs/rank<R>.log``.

It receives what the rank logs to the console, from the moment the start-up checks have passed, and the traceback
of any error that ends the run — whose console report is one ``genlip-train: ...`` line. A configuration or input
error found at start writes nothing (no log file either).
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path


def log_file(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / "logs" / f"rank{rank}.log"


def attach(out_dir: str | Path, rank: int) -> logging.Handler:
    """Copy this process's log records (those the console gets) to the rank's log file, appending."""
    path = log_file(out_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def detach(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


def write_traceback(out_dir: str | Path, rank: int, exc: BaseException) -> Path | None:
    """Append ``exc``'s traceback to the rank's log file; its path, or None when it cannot be written."""
    path = log_file(out_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} the run ended with this error on rank {rank}:\n")
            f.write("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return path


__all__ = ["attach", "detach", "log_file", "write_traceback"]
