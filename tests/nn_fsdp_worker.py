"""One rank of tests/test_nn_modules.py's FSDP2 check: tiny-qwen3 with one block (GatedPrefixLMAttention with GQA
and q/k norm, LinearCrossEntropy as the head) on the fused ops, the attention module and the head compiled with
``fullgraph=True`` and sharded with ``fully_shard``, then the model with the trainer's ``apply_fsdp``; one step's
gradients against an unsharded eager copy on the reference ops fed every rank's data. Writes the largest relative
error as JSON.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p TRITON_INTERPRET=1 python nn_fsdp_worker.py OUT_JSON
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from genlip_fast.data.batch import Sample
from genlip_fast.data.packing import pack_samples
from genlip_fast.model import GenLIP, get_preset
from genlip_fast.train.distributed import (apply_fsdp, build_mesh, destroy_process_group, mixed_precision_policy,
                                           prepare_micro_step)


def pack_of(rank: int):
    g = torch.Generator().manual_seed(rank)
    grids = [(2, 3), (0, 0), (3, 1)] if rank else [(3, 3), (1, 2)]
    return pack_samples([Sample(torch.randn(h * w, 768, generator=g), (h, w),
                                torch.randint(3, 500, (2 + (3 * rank + j) % 5,), generator=g), key=f"{rank}-{j}")
                         for j, (h, w) in enumerate(grids)])


def main() -> None:
    out_json = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = GenLIP(get_preset("tiny-qwen3", attn_backend="triton", ce_backend="triton", vocab_size=509, n_layers=1))
    packs = {r: pack_of(r) for r in range(world)}
    denom = float(sum(p.num_loss_tokens for p in packs.values()))

    ref = copy.deepcopy(base)  # eager, unsharded, on the reference ops (fast on CPU), every rank's pack
    for m in [ref.lm_head] + [b.attn for b in ref.blocks]:
        m.impl = "reference"
    for p in packs.values():
        ref(p, loss_denominator=denom).backward()

    model = copy.deepcopy(base)
    mesh = build_mesh("cpu", 1, world)
    for block in model.blocks:
        block.attn.compile(fullgraph=True, backend="aot_eager")  # a graph break would raise
        fully_shard(block.attn, mesh=mesh)
    model.lm_head.compile(fullgraph=True, backend="aot_eager")
    fully_shard(model.lm_head, mesh=mesh)
    apply_fsdp(model, mesh, mixed_precision_policy("fp32", torch.device("cpu")))
    prepare_micro_step(model, 0, 1)
    model(packs[rank], loss_denominator=denom).backward()

    err = 0.0
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad.full_tensor()
        err = max(err, ((g - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)).item())
    sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump({"max_rel_err": err, "dtensor_params": sharded,
                       "params": len(list(model.parameters()))}, f)


if __name__ == "__main__":
    main()
    destroy_process_group()  # after main's model is dropped: see its docstring
