"""Conversions between the authors' layout (``official.py``) and genlip_fast's forms, run by ``python -m
genlip_fast.convert``: :func:`import_official` writes a trainer-format checkpoint (``format.py``) from the authors'
folder, :func:`export_official` writes any form :func:`~genlip_fast.checkpoint.load.load_model` reads in the
authors' layout.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp

from .format import META, model_config_dict
from .load import load_model
from .manifest import describe, write_manifest
from .official import DTYPES, GENLIP_FAST_INPUTS, config_to_official, load_official, to_official, write_official


def import_official(src: str | Path, out: str | Path) -> dict:
    """The authors' folder -> a genlip_fast checkpoint folder (DCP + meta.json + manifest.json, fp32, model only:
    written by no training rank, so ``world_size`` 0 and no rank files): loadable by ``--checkpoint.init_from``,
    ``python -m genlip_fast.speak`` and :func:`genlip_fast.load_encoder`."""
    model, inputs = load_official(src)
    out = Path(out)
    if (out / META).exists():
        raise FileExistsError(f"{out} already holds a checkpoint; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(out), no_dist=True)
    meta = {"step": 0, "world_size": 0,
            "model_config": model_config_dict(model.cfg),
            "inputs": inputs.to_dict(), "source": {"official": str(Path(src).resolve())}}
    (out / META).write_text(json.dumps(meta, indent=2))
    write_manifest(out, describe(out, sorted(os.listdir(out))))  # what every checkpoint read is checked against
    return {"checkpoint": str(out), "parameters": sum(p.numel() for p in model.parameters()), "config": model.cfg}


def export_official(ckpt: str | Path, out_dir: str | Path, *, dtype: str = "fp32",
                    max_shard_bytes: int = 5 * 2**30) -> dict:
    """A genlip_fast checkpoint (trainer folder, run folder, or an imported one) -> the authors' layout."""
    model, inputs = load_model(ckpt)
    cfg = model.cfg
    sd = {k: v.detach().to(DTYPES[dtype]) for k, v in to_official(model.state_dict(), cfg).items()}
    config = {**config_to_official(cfg, DTYPES[dtype]), GENLIP_FAST_INPUTS: inputs.to_dict()}
    files = write_official(out_dir, config, sd, max_shard_bytes=max_shard_bytes, inputs=inputs)
    return {"files": [str(f) for f in files], "tensors": len(sd), "parameters": sum(t.numel() for t in sd.values())}
