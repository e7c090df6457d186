"""``python -m genlip_fast.convert``: the authors' checkpoints (HF ``GenLIPModel`` layout), both ways, and the
transformers package of a vision encoder.

    python -m genlip_fast.convert import-official SRC_DIR OUT     # config.json + safetensors -> checkpoint folder
    python -m genlip_fast.convert export-official CKPT OUT_DIR    # checkpoint / run folder -> config.json + shards
    python -m genlip_fast.convert export-hf CKPT OUT_DIR          # -> AutoModel / AutoImageProcessor folder

The imported checkpoint starts a run (``--checkpoint.init_from=OUT``), captions (``python -m genlip_fast.speak
IMAGE --checkpoint OUT``) and encodes (``genlip_fast.load_encoder(OUT)``). Converting image-caption data into
shards is ``python -m genlip_fast.data.convert``. The ``export-hf`` folder loads with
``AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True)`` (``genlip_fast/checkpoint/hf/``).
"""

from __future__ import annotations

import argparse
import sys

from .data.inputs import image_size_arg


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
    hf = sub.add_parser("export-hf", help="a genlip_fast checkpoint -> a transformers folder (trust_remote_code)")
    hf.add_argument("ckpt", help="checkpoint folder, run folder, exported .safetensors or the authors' folder")
    hf.add_argument("out_dir", help="new output folder (config.json, preprocessor_config.json, code, safetensors)")
    hf.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="tensor dtype")
    hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    hf.add_argument("--image-size", type=image_size_arg, default=None,
                    help="N: a fixed-size image processor, pixel_values (B, 3, N, N); 'native': native aspect "
                         "ratio, flat patches + image_grid_thw; default: the checkpoint's own")
    args = ap.parse_args(argv)

    from .checkpoint import CheckpointError, OfficialFormatError, export_official, import_official
    from .checkpoint.sharded import parse_size

    try:
        if args.command == "import-official":
            r = import_official(args.src, args.out)
            print(f"wrote {r['checkpoint']}: {r['parameters']:,} parameters")
        elif args.command == "export-hf":
            from .checkpoint.hf import export_hf

            r = export_hf(args.ckpt, args.out_dir, dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size),
                          image_size=args.image_size)
            print(f"wrote {args.out_dir}: {r['tensors']} tensors, {r['parameters']:,} parameters ({args.dtype}) "
                  f"in {len(r['files'])} file(s); load it with AutoModel.from_pretrained(..., trust_remote_code=True)")
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
