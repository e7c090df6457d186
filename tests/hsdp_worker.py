"""One rank of the HSDP tests (tests/test_hsdp.py), run under torchrun with 4 ranks; writes what it saw as JSON.

Part 1, for each mesh shape (1x4 FSDP, 2x2 HSDP, 4x1 replicas): the tiny model under ``apply_fsdp`` takes one
step's gradients twice — accumulated over 3 micro-steps, and from one pack holding the same samples — while a
:class:`CollectiveRecorder` records every collective; a plain unsharded copy on this rank gives the reference
gradients of all ranks' data. Part 2: the trainer itself (``python -m genlip_fast.train``'s ``main``) continues one
run across mesh shapes, each leg resuming the checkpoint of the one before: the default mesh (2x2 when launched
as two torchrun agents of 2 ranks), then 1x4, then 4x1. The pytest side compares everything.

    OUT_DIR=RUN_DIR TRAIN_MODULE=hsdp_worker bash scripts/slurm/train.sbatch OUT_JSON SHAPES_DIR
    (or python -m torch.distributed.run ... -m hsdp_worker --train.out_dir=RUN_DIR OUT_JSON SHAPES_DIR)
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

from genlip_fast.data.batch import Sample
from genlip_fast.data.packing import pack_samples
from genlip_fast.model import GenLIP, get_preset
from genlip_fast.train.distributed import (apply_fsdp, build_mesh, destroy_process_group, mixed_precision_policy,
                                           prepare_micro_step)
from genlip_fast.train.scaling import CollectiveRecorder, fsdp_units, step_collectives, summarize

MESHES = [(1, 4), (2, 2), (4, 1)]
MICRO = 3
# Trainer legs: (name, extra overrides, stop after step). Four data streams: the same packs on any mesh.
LEGS = [("default", [], 2), ("1x4", ["--parallel.replicate=1"], 4), ("4x1", ["--parallel.replicate=4"], 6)]


def samples_of(rank: int, micro: int) -> list[Sample]:
    """Three samples of awkward sizes for (rank, micro-step); text-only and image-only-ish ones included."""
    g = torch.Generator().manual_seed(1000 * rank + micro)
    grids = [(2, 3), (1, 1), (3, 2)] if micro % 2 else [(4, 1), (0, 0), (2, 2)]
    out = []
    for j, (h, w) in enumerate(grids):
        n_text = 1 + (7 * rank + 5 * micro + 3 * j) % 6
        out.append(Sample(torch.randn(h * w, 768, generator=g), (h, w), torch.randint(0, 500, (n_text,), generator=g),
                          key=f"r{rank}m{micro}s{j}"))
    return out


def full_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def max_rel_err(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)).item() for n in b)


def model_checks(rank: int, world: int) -> dict:
    # odd vocab and FFN widths: FSDP2 pads their shards, and the byte model must count the padding
    mcfg = get_preset("tiny", attn_backend="reference", ce_backend="reference", vocab_size=509, ffn_dim=350)
    torch.manual_seed(0)
    base = GenLIP(mcfg)
    per_rank = {r: [pack_samples(samples_of(r, m)) for m in range(MICRO)] for r in range(world)}
    denom = float(sum(b.num_loss_tokens for packs in per_rank.values() for b in packs))

    # the reference: every rank's samples through one unsharded copy, gradients summed
    ref = copy.deepcopy(base)
    for packs in per_rank.values():
        for b in packs:
            ref(b, loss_denominator=denom).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    out = {}
    for R, S in MESHES:
        mesh = build_mesh("cpu", R, S)
        result = {}
        for mode, packs in (("accumulated", per_rank[rank]),
                            ("one_pack", [pack_samples([s for m in range(MICRO) for s in samples_of(rank, m)])])):
            model = copy.deepcopy(base)
            apply_fsdp(model, mesh, mixed_precision_policy("fp32", torch.device("cpu")))
            rec = CollectiveRecorder()
            with rec:
                for i, b in enumerate(packs):
                    prepare_micro_step(model, i, len(packs))
                    model(b, loss_denominator=denom).backward()
            grads = full_grads(model)
            result[mode] = {
                "err_vs_reference": max_rel_err(grads, ref_grads),
                "measured": sorted([list(k) + [v] for k, v in rec.summary().items()]),
            }
            result[mode + "_grads"] = grads
        result["err_accumulated_vs_one_pack"] = max_rel_err(result.pop("accumulated_grads"),
                                                            result.pop("one_pack_grads"))
        predicted = summarize(step_collectives(fsdp_units(mcfg), R, S, param_bytes=4, grad_bytes=4))
        result["model"] = sorted([list(k) + [v] for k, v in predicted.items()])
        out[f"{R}x{S}"] = result
    return out


def trainer_legs(shapes: str, run_dir: str) -> dict:
    from genlip_fast.train.__main__ import main
    from tiny_run import tiny_overrides

    over = tiny_overrides(shapes, run_dir, steps=8, parallel__data_streams=4, checkpoint__every=2)
    codes = {}
    for name, extra, stop in LEGS:
        codes[name] = main(["--no-progress", *over, f"--train.stop_at_step={stop}", *extra])
    return codes


def main() -> None:
    # the arguments the Slurm script passes to a training module, and this worker's own two
    run_dir = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--train.out_dir="))
    out_json, shapes = [a for a in sys.argv[1:] if not a.startswith("--")]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {"meshes": model_checks(rank, world), "trainer_exit_codes": trainer_legs(shapes, run_dir)}
    report["local_world_size"] = int(os.environ["LOCAL_WORLD_SIZE"])
    dist.barrier()
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(report, f, indent=1)
    destroy_process_group()


if __name__ == "__main__":
    main()
