"""``python -m genlip_fast.data COMMAND ...``: the data tools in one place.

::

    python -m genlip_fast.data report SPEC [--stage 1|2] [--sample N]   # what a dataset holds, before training
    python -m genlip_fast.data convert SRC OUT [...]                      # = python -m genlip_fast.data.convert
    python -m genlip_fast.data manifest DIR [...] [--index]               # = python -m genlip_fast.data.manifest
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("report", "convert", "manifest")
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command, rest = argv[0], argv[1:]
    if command == "report":
        from .report import main as run
    elif command == "convert":
        from .convert import main as run
    else:
        from .manifest import main as run
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
