"""A genlip_fast model -> a folder transformers loads with ``trust_remote_code=True`` (``export-hf``).

    python -m genlip_fast.convert export-hf runs/so16_stage2 genlip-so16-hf [--dtype bf16] [--image-size 384]

The folder holds ``config.json`` (``model_type`` ``genlip_fast_vision``, ``auto_map``, the tower's fields, where the
weights came from), ``preprocessor_config.json``, the three code files of this package and the vision part's
weights (patch embedding, blocks, final norm) as safetensors, in shards with an index past ``max_shard_bytes``.
Tensor names are genlip_fast's own (``blocks.N.attn.q_proj.weight``, ...), so nothing is permuted.

The image processor reproduces the checkpoint's own preprocessing. Where a transformers processor gives the same
pixels — the authors' weights: SigLIP's squash at a fixed size, Qwen2-VL's ``smart_resize`` at native aspect — the
preprocessor config names it (``image_processor_type``) besides the ``auto_map``, so ``AutoImageProcessor`` loads it
without ``trust_remote_code`` (LLaVA-NeXT's ``hf:`` towers load theirs that way) and ours with it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import torch

from ...data.inputs import ImageTransform
from ...model import GenLIP, ModelConfig
from ..export import DTYPES
from ..load import load_model, origin
from ..sharded import write_shards

MODEL_TYPE = "genlip_fast_vision"
CODE_FILES = ("configuration_genlip_fast.py", "modeling_genlip_fast.py", "image_processing_genlip_fast.py")
AUTO_MAP = {"AutoConfig": "configuration_genlip_fast.GenLIPVisionConfig",
            "AutoModel": "modeling_genlip_fast.GenLIPVisionModel"}
PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "image_processing_genlip_fast.GenLIPImageProcessor"}
VISION_PREFIXES = ("patch_embed.", "blocks.", "norm.")


class HFExportError(ValueError):
    """A model or option the transformers package cannot represent; the message names the field."""


def nominal_image_size(image: ImageTransform) -> int:
    """``config.image_size`` / the processor's ``crop_size``: the fixed size when there is one, else the largest
    square the native-aspect rule keeps at its own resolution (512 px for 1,024 patches of 16)."""
    if image.image_size is not None:
        return image.image_size
    return math.isqrt(image.max_patches) * image.patch_size


def hf_config(cfg: ModelConfig, image: ImageTransform, *, dtype: str = "fp32", provenance: dict | None = None) -> dict:
    """``config.json`` of the tower (``GenLIPVisionConfig``'s fields) for ``cfg``; :class:`HFExportError` naming the
    field when the package cannot run it."""
    if cfg.in_channels != 3:
        raise HFExportError(f"in_channels={cfg.in_channels}: the exported image processor makes RGB images "
                            "(3 channels)")
    if image.patch_size != cfg.patch_size:
        raise HFExportError(f"the inputs' patch_size {image.patch_size} differs from the model's {cfg.patch_size}")
    return {
        "architectures": ["GenLIPVisionModel"], "model_type": MODEL_TYPE, "auto_map": dict(AUTO_MAP),
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim,
        "hidden_act": "silu", "patch_size": cfg.patch_size, "num_channels": cfg.in_channels,
        "image_size": nominal_image_size(image), "norm_type": cfg.norm, "layer_norm_eps": cfg.norm_eps,
        "qk_norm": cfg.qk_norm, "attention_bias": cfg.attn_bias, "mlp_bias": cfg.mlp_bias, "gate": cfg.gate,
        "layer_scale_init_value": cfg.layer_scale_init, "rope_theta": cfg.rope_theta,
        "mrope_section": list(cfg.mrope_section), "mrope_interleaved": cfg.mrope_interleaved,
        "initializer_range": 0.02,
        # the weights' dtype: transformers 4.x reads torch_dtype, 5.x dtype
        "torch_dtype": str(DTYPES[dtype]).removeprefix("torch."), "dtype": str(DTYPES[dtype]).removeprefix("torch."),
        "genlip_fast": provenance or {},
    }


def preprocessor_config(image: ImageTransform) -> dict:
    """``preprocessor_config.json``: ``GenLIPImageProcessor``'s fields, and for the authors' resize rule the
    transformers processor that gives the same pixels (its own keys beside ours)."""
    S, p = image.image_size, image.patch_size
    ours = {"image_processor_type": "GenLIPImageProcessor", "auto_map": dict(PROCESSOR_AUTO_MAP),
            "patch_size": p, "image_size": S, "min_patches": image.min_patches, "max_patches": image.max_patches,
            "resize_rule": image.resize_rule, "image_mean": list(image.pixel_mean), "image_std": list(image.pixel_std),
            "crop_size": {"height": nominal_image_size(image), "width": nominal_image_size(image)}}
    if image.resize_rule != "siglip_qwen2vl":
        return ours
    stock = {"do_resize": True, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "do_convert_rgb": True}
    if S is not None:  # SigLIP: squash to S x S, bilinear
        return {**ours, **stock, "image_processor_type": "SiglipImageProcessor", "size": {"height": S, "width": S}}
    lo, hi = image.min_patches * p * p, image.max_patches * p * p  # Qwen2-VL: smart_resize, factor p, one frame
    return {**ours, **stock, "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": lo, "max_pixels": hi,
            "size": {"shortest_edge": lo, "longest_edge": hi}, "merge_size": 1, "temporal_patch_size": 1}


def vision_state_dict(model: GenLIP, dtype: str) -> dict[str, torch.Tensor]:
    """The tensors the tower has (patch embedding, blocks, final norm), in ``dtype``, under genlip_fast's names."""
    return {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()
            if k.startswith(VISION_PREFIXES)}


def code_commit() -> str | None:
    """The git commit of the genlip_fast code doing the export (None outside a git checkout)."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


def write_hf(model: GenLIP, image: ImageTransform, out_dir: str | Path, *, dtype: str = "fp32",
             max_shard_bytes: int = 5 * 2**30, provenance: dict | None = None) -> dict:
    """Write the transformers folder for ``model`` read through ``image``; ``out_dir`` must be new or empty (a
    stale weight file beside new ones would be loaded)."""
    if dtype not in DTYPES:
        raise HFExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config = hf_config(model.cfg, image, dtype=dtype, provenance=provenance)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    sd = vision_state_dict(model, dtype)
    files = write_shards(out, sd, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(image), indent=2))
    for f in CODE_FILES:
        shutil.copyfile(Path(__file__).with_name(f), out / f)
    return {"files": [str(f) for f in files], "tensors": len(sd), "parameters": sum(t.numel() for t in sd.values())}


def export_hf(ckpt: str | Path, out_dir: str | Path, *, dtype: str = "fp32", max_shard_bytes: int = 5 * 2**30,
              image_size: int | str | None = None) -> dict:
    """A genlip_fast checkpoint (any form :func:`~genlip_fast.checkpoint.load.load_model` reads) -> the
    transformers folder. ``image_size``: None keeps the checkpoint's own preprocessing, an int makes the image
    processor a fixed-size one (``pixel_values (B, 3, S, S)``), "native" a native-aspect one."""
    model, inputs = load_model(ckpt, need_text=False)
    src = origin(ckpt)
    provenance = {"source": str(ckpt), "read": src["path"], "step": src["step"], "commit": code_commit(),
                  "model_config": {**model.cfg.__dict__, "mrope_section": list(model.cfg.mrope_section)},
                  "inputs": inputs.to_dict()}
    return write_hf(model, inputs.image.sized(image_size), out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                    provenance=provenance)
