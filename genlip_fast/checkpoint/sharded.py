"""Tensors as Hugging Face-style safetensors shards (``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
with ``model.safetensors.index.json``), shared by the authors' layout and the transformers package."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"


def write_shards(out: str | Path, sd: dict[str, torch.Tensor], max_shard_bytes: int) -> list[Path]:
    """Write ``sd`` into ``out`` in shards of at most ``max_shard_bytes`` (a tensor larger than that gets a shard of
    its own), in ``sd``'s order, with an index when there is more than one. Returns the safetensors files."""
    from safetensors.torch import save_file

    out = Path(out)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += n
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for f, part in zip(files, shards):
        save_file(part, str(out / f), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {name: f for f, part in zip(files, shards) for name in part}
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [out / f for f in files]


def parse_size(text: str) -> int:
    """'5GB', '500MB', '10KB' or a byte count -> bytes (powers of 1024)."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    t = text.strip().upper()
    for u, mult in units.items():
        if t.endswith(u):
            return int(math.floor(float(t[: -len(u)]) * mult))
    return int(t)
