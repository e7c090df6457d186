"""Export a training checkpoint as one consolidated safetensors file.

    python -m genlip_fast.train.export runs/so16_stage2 so16_encoder.safetensors --vision-only --dtype bf16

The source may be a checkpoint folder, a checkpoints folder or a run's out_dir (its latest checkpoint). It runs in
one process on CPU, whatever number of ranks wrote the checkpoint (DCP reshards on load). ``--vision-only`` keeps
what the vision encoder uses (patch embedding, blocks, final norm) and drops the text embedding and LM head. The
model config is stored in the file's metadata (``genlip_model_config``), so :func:`load_exported` rebuilds the
model from the file alone.

:func:`load_model` reads any of the three forms a model comes in — a trainer checkpoint, an exported file, or a
folder in the authors' layout (``train/official.py``) — with how it reads its inputs; :func:`load_encoder` makes
the vision encoder of one (``genlip_fast.load_encoder``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch

from ..model import GenLIP, ModelConfig
from ..speak.encoder import VisionEncoder
from ..data.inputs import ImageTransform, InputSpec
from ..train.checkpoint import load_dcp, read_meta, require_passing, resolve_checkpoint

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
        "genlip_inputs": json.dumps(inputs_from_meta(meta).to_dict()),
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


def inputs_from_meta(meta: dict) -> InputSpec:
    """How a checkpoint's model reads its inputs: stored by an import, or the run's data config (its tokenizer, patch
    size and patch range, and ``data.pixel_norm``, CLIP's statistics for runs that predate it). Images keep their
    native aspect ratio (stage 2's rule) unless a fixed size is asked for."""
    if "inputs" in meta:
        return InputSpec.from_dict(meta["inputs"])
    data = meta.get("job_config", {}).get("data", {})
    data = {"patch_size": meta["model_config"].get("patch_size", 16), **data}
    return InputSpec(tokenizer=data.get("tokenizer", "demo"), image=ImageTransform.of_data(data, stage=2))


def load_model(path: str | Path, *, need_text: bool = True) -> tuple[GenLIP, InputSpec]:
    """A :class:`GenLIP` (fp32, CPU, eval mode) from a trainer checkpoint (or run folder), an exported
    ``.safetensors`` file, or a folder in the authors' layout; and how it reads its inputs. A ``--vision-only``
    export has no text embedding or LM head: it is refused unless ``need_text=False`` (the encoder)."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        from .official import load_official

        model, inputs = load_official(p)
    elif p.suffix == ".safetensors":
        from safetensors import safe_open

        if not p.is_file():
            raise FileNotFoundError(f"no exported model file at {p}")
        with safe_open(str(p), framework="pt") as f:
            md = f.metadata()
        if need_text and md.get("genlip_vision_only") == "true":
            raise ValueError(f"{p} is a --vision-only export (no text embedding or LM head); captioning needs the "
                             f"checkpoint it came from or a full export")
        model = load_exported(p)
        inputs = InputSpec.from_dict(json.loads(md["genlip_inputs"])) if "genlip_inputs" in md else InputSpec()
    else:
        model, meta = load_checkpoint_model(p)
        inputs = inputs_from_meta(meta)
    model.cfg.attn_backend = model.cfg.ce_backend = "auto"  # a training run's choice need not fit this machine
    return model.eval(), inputs


def load_encoder(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 image_size: int | None = None, attn_backend: str = "auto") -> VisionEncoder:
    """The vision encoder of a checkpoint (any form :func:`load_model` reads), in ``dtype`` on ``device``.

    ``image_size`` None keeps each image's aspect ratio (16–1024 patches, stage 2's rule); an int resizes and
    centre-crops to that square (stage 1). Call it with a list of PIL images / uint8 arrays (or patches with
    grids); it returns per-image ``(grid_h * grid_w, d)`` final-LayerNorm features.
    """
    model, inputs = load_model(path, need_text=False)
    model.cfg.attn_backend = attn_backend
    transform = dataclasses.replace(inputs.image, image_size=image_size)
    return VisionEncoder(model, transform).to(device=device, dtype=dtype).eval()


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
