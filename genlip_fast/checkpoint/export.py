"""Export a training checkpoint as one consolidated safetensors file.

    python -m genlip_fast.checkpoint.export runs/so16_stage2 so16_encoder.safetensors --vision-only --dtype bf16

(``genlip-export`` and the older ``python -m genlip_fast.train.export`` run the same command.) The source may be a
checkpoint folder, a checkpoints folder or a run's out_dir (its latest checkpoint). It runs in one process on CPU,
whatever number of ranks wrote the checkpoint (DCP reshards on load). ``--vision-only`` keeps what the vision encoder
uses (patch embedding, blocks, final norm) and drops the text embedding and LM head. The model config is stored in
the file's metadata (``genlip_model_config``), so :func:`~genlip_fast.checkpoint.load.load_exported` rebuilds the
model from the file alone; ``load.py`` reads it back, as it reads every form a model comes in.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .load import inputs_from_meta, load_checkpoint_model

TEXT_PREFIXES = ("text_embed.", "text_in.", "text_out.", "lm_head.")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export(src: str | Path, dst: str | Path, *, vision_only: bool = False, dtype: str = "fp32") -> dict:
    """Write ``dst`` (safetensors); returns a summary (tensors, parameters, step)."""
    from safetensors.torch import save_file

    model, meta = load_checkpoint_model(src)
    tensors = {}
    for name, t in model.state_dict().items():
        if vision_only and name.startswith(TEXT_PREFIXES):
            continue
        tensors[name] = t.detach().to(DTYPES[dtype]).contiguous()
    info = {
        "format": "pt",
        "genlip_model_config": json.dumps(meta["model_config"]),
        "genlip_inputs": json.dumps(inputs_from_meta(meta).to_dict()),
        "genlip_step": str(meta["step"]),
        "genlip_vision_only": str(vision_only).lower(),
        "genlip_source": meta["checkpoint"],
    }
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=info)
    return {"tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()), "step": meta["step"],
            "checkpoint": meta["checkpoint"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m genlip_fast.checkpoint.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="checkpoint folder, checkpoints folder or run out_dir")
    ap.add_argument("dst", help="output .safetensors file")
    ap.add_argument("--vision-only", action="store_true", help="drop the text embedding and LM head")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = ap.parse_args(argv)
    try:
        summary = export(args.src, args.dst, vision_only=args.vision_only, dtype=args.dtype)
    except FileNotFoundError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: {summary['tensors']} tensors, {summary['parameters']:,} parameters "
          f"({args.dtype}) from {summary['checkpoint']} (step {summary['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
