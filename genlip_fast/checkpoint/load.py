"""How a model is loaded from any of the forms it comes in, with how it reads its inputs.

:func:`load_model` reads a trainer checkpoint (or a run's out_dir, or a checkpoints folder: its latest checkpoint),
an exported ``.safetensors`` file (``export.py``), or a folder in the authors' layout (``official.py``) and gives
``(GenLIP, InputSpec)``. This is the one module that says which form a path is and how it is read: the conversions
(``export.py``, ``convert.py``), ``genlip_fast.load_encoder``, captioning and the probe import it; it imports only
the readers of the formats (``format.py``, ``safe_load.py``, ``official.py``), never a conversion.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..data.inputs import ImageTransform, InputSpec
from ..model import GenLIP, ModelConfig
from .format import model_config_from_dict, read_meta, require_passing, resolve_checkpoint
from .safe_load import load_dcp


def model_config_from_meta(meta: dict) -> ModelConfig:
    return model_config_from_dict(meta["model_config"])


def load_checkpoint_model(path: str | Path) -> tuple[GenLIP, dict]:
    """The full model of a checkpoint on CPU (fp32), and the checkpoint's meta.json."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    cfg = model_config_from_meta(meta)
    with torch.device("meta"):
        model = GenLIP(cfg)
    model = model.to_empty(device="cpu")
    sd = model.state_dict()
    require_passing(ckpt)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        load_dcp({"model": sd}, ckpt, no_dist=True)  # fills the module's tensors in place; refuses pickled code
    return model, {**meta, "checkpoint": str(ckpt)}


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> GenLIP:
    """A :class:`GenLIP` from an exported file (a vision-only file leaves the text parts at their init)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    model = GenLIP(model_config_from_dict(json.loads(md["genlip_model_config"])))
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
    if _is_official(p):
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
    model.set_backends(attn="auto", ce="auto")  # a training run's choice need not fit this machine
    return model.eval(), inputs


def _is_official(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def origin(path: str | Path) -> dict:
    """Where the model :func:`load_model` reads at ``path`` comes from, for provenance records: ``form``
    ("checkpoint", "exported" or "official"), the ``path`` actually read and its training ``step`` (None for the
    authors' layout, which records none)."""
    p = Path(path)
    if _is_official(p):
        return {"form": "official", "path": str(p.resolve()), "step": None}
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            step = f.metadata().get("genlip_step")
        return {"form": "exported", "path": str(p.resolve()), "step": None if step is None else int(step)}
    ckpt = resolve_checkpoint(p)
    return {"form": "checkpoint", "path": str(ckpt.resolve()), "step": read_meta(ckpt)["step"]}
