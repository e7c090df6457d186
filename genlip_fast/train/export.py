"""``python -m genlip_fast.train.export``: the command's older name, kept so existing scripts run; the export is
:mod:`genlip_fast.checkpoint.export` (``python -m genlip_fast.checkpoint.export``, ``genlip-export``)."""

import sys

from ..checkpoint.export import main

if __name__ == "__main__":
    sys.exit(main())
