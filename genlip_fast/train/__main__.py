"""``python -m genlip_fast.train [--config NAME_OR_TOML] [--section.key=value ...]``

With no arguments: the tiny demo on generated shapes, on CPU, in a few minutes.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="genlip-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="bundled preset name or TOML path (default: tiny)")
    args, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        print(f"genlip-train: config error: {e}", file=sys.stderr)
        return 2
    from .loop import train

    result = train(cfg)
    losses = result["losses"]
    k = max(1, min(20, len(losses) // 10))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"\nloss: first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    if result["captions"]:
        print("\nLet ViT Speak — held-out images:")
        for c in result["captions"]:
            print(f"  true:      {c['true']}\n  generated: {c['generated']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
