"""``python -m genlip_fast.convert``: the authors' checkpoints (HF ``GenLIPModel`` layout), both ways.

    python -m genlip_fast.convert import-official SRC_DIR OUT     # config.json + safetensors -> checkpoint folder
    python -m genlip_fast.convert export-official CKPT OUT_DIR    # checkpoint / run folder -> config.json + shards

The imported checkpoint starts a run (``--checkpoint.init_from=OUT``), captions (``python -m genlip_fast.speak
IMAGE --checkpoint OUT``) and encodes (``genlip_fast.load_encoder(OUT)``). Converting image-caption data into
shards is ``python -m genlip_fast.data.convert``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m genlip_fast.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-official", help="the authors' folder -> a genlip_fast checkpoint folder")
    imp.add_argument("src", help="folder with config.json and *.safetensors (sharded with an index is fine)")
    imp.add_argument("out", help="new checkpoint folder")
    exp = sub.add_parser("export-official", help="a genlip_fast checkpoint -> the authors' layout")
    exp.add_argument("ckpt", help="checkpoint folder, run folder, exported .safetensors or imported checkpoint")
    exp.add_argument("out_dir", help="output folder (config.json, model*.safetensors, preprocessor_config.json)")
    exp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                     help="tensor dtype (the authors export bf16; fp32 keeps the weights exactly)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    args = ap.parse_args(argv)

    from .checkpoint import CheckpointError, OfficialFormatError, export_official, import_official
    from .checkpoint.official import parse_size

    try:
        if args.command == "import-official":
            r = import_official(args.src, args.out)
            print(f"wrote {r['checkpoint']}: {r['parameters']:,} parameters")
        else:
            r = export_official(args.ckpt, args.out_dir, dtype=args.dtype,
                                max_shard_bytes=parse_size(args.max_shard_size))
            print(f"wrote {args.out_dir}: {r['tensors']} tensors, {r['parameters']:,} parameters ({args.dtype}) "
                  f"in {len(r['files'])} file(s)")
    except (FileNotFoundError, FileExistsError, OfficialFormatError, ValueError, CheckpointError) as e:
        print(f"convert {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
