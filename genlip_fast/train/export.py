"""Export a training checkpoint as one consolidated safetensors file.

    python -m genlip_fast.train.export runs/so16_stage2 so16_encoder.safetensors --vision-only --dtype bf16

The source may be a checkpoint folder, a checkpoints folder or a run's out_dir (its latest checkpoint). It runs in
one process on CPU, whatever number of ranks wrote the checkpoint (DCP reshards on load). ``--vision-only`` keeps
what the vision encoder uses (patch embedding, blocks, final norm) and drops the text embedding and LM head. The
model config is stored in the file's metadata (``genlip_model_config``), so :func:`load_exported` rebuilds the
model from the file alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from ..model import GenLIP, ModelConfig
from .checkpoint import load_dcp, read_meta, require_passing, resolve_checkpoint

TEXT_PREFIXES = ("text_embed.", "text_in.", "text_out.", "lm_head.")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_config_from_meta(meta: dict) -> ModelConfig:
    d = dict(meta["model_config"])
    d["mrope_section"] = tuple(d["mrope_section"])
    return ModelConfig(**d)


def load_checkpoint_model(path: str | Path) -> tuple[GenLIP, dict]:
    """The full model of a checkpoint on CPU (fp32), and the checkpoint's meta.json."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    cfg = model_config_from_meta(meta)
    with torch.device("meta"):
        model = GenLIP(cfg)
    model = model.to_empty(device="cpu")
    sd = model.state_dict()
    require_passing(ckpt, distributed=False)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        load_dcp({"model": sd}, ckpt, no_dist=True)  # fills the module's tensors in place; refuses pickled code
    return model, {**meta, "checkpoint": str(ckpt)}


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
        "genlip_step": str(meta["step"]),
        "genlip_vision_only": str(vision_only).lower(),
        "genlip_source": meta["checkpoint"],
    }
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=info)
    return {"tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()), "step": meta["step"],
            "checkpoint": meta["checkpoint"]}


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> GenLIP:
    """A :class:`GenLIP` from an exported file (a vision-only file leaves the text parts at their init)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    cfg_dict = json.loads(md["genlip_model_config"])
    cfg_dict["mrope_section"] = tuple(cfg_dict["mrope_section"])
    model = GenLIP(ModelConfig(**cfg_dict))
    sd = load_file(str(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or (missing and md.get("genlip_vision_only") != "true"):
        raise ValueError(f"{path}: missing {missing}, unexpected {unexpected}")
    return model.to(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m genlip_fast.train.export", description=__doc__,
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
