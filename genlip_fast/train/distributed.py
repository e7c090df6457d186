"""Process group, device mesh and the FSDP2 wrapping of GenLIP.

Launch with torchrun (``torchrun --nproc_per_node=8 -m genlip_fast.train ...``, or ``srun torchrun ...`` on
Slurm): it sets RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous. A plain ``python -m genlip_fast.train`` is a
one-process group (an in-memory store), so the same FSDP2 code path runs everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    owns_group: bool
    """True when this module created the process group (and so destroys it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but no CUDA device is visible")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device_name: str = "auto", backend: str = "auto") -> DistInfo:
    """Join (or create) the process group; one process per GPU. Returns this rank's view."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        owns = True
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            store, rank, world = next(dist.rendezvous("env://"))
            # torchrun's store outlives a restart: keep each attempt's keys (peer addresses, barrier counters)
            # apart, or a restarted rank can read a dead peer's address and fail to connect.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"genlip_attempt_{attempt}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    device_id=device if device.type == "cuda" else None)
        else:  # a plain single process: an in-memory store, no network
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    return DistInfo(rank, world, local_rank, device, mesh, owns)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def mixed_precision_policy(mode: str, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters for compute with fp32 gradient reduction on CUDA; plain fp32 on CPU (or when asked)."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "fp32"
    if mode == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


def checkpoint_block(block: nn.Module) -> None:
    """Recompute ``block``'s forward in backward (non-reentrant; drop-path RNG is replayed). Parameter names and the
    module tree are unchanged, so checkpoints do not depend on this choice."""
    forward = block.forward

    @functools.wraps(forward)
    def recomputed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed


def blocks_to_checkpoint(n_blocks: int, mode: str, ratio: float = 0.5) -> list[int]:
    """Indices of the blocks to checkpoint: none, all, or ``ratio`` of them spread evenly (0.5 -> every other)."""
    if mode == "none":
        return []
    if mode == "full":
        return list(range(n_blocks))
    # block i is picked when the running count floor((i + 1) * ratio) steps up
    return [i for i in range(n_blocks) if int((i + 1) * ratio) > int(i * ratio)]


def apply_activation_checkpointing(model: nn.Module, mode: str, ratio: float = 0.5) -> list[int]:
    picked = blocks_to_checkpoint(len(model.blocks), mode, ratio)
    for i in picked:
        checkpoint_block(model.blocks[i])
    return picked


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (names unchanged). Packs vary in length, so shapes are marked dynamic."""
    for block in model.blocks:
        block.compile(dynamic=True)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy, *,
               reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: ``fully_shard`` each block, then the root (embeddings, final norm and LM head stay in the root's
    group). Gradients are reduced as a plain sum: the loss is already divided by the global loss-token count."""
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters are needed again right after the forward (LM head) and first in the backward.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            # plain SUM collectives: gloo has no pre-multiplied sum, and NCCL's zero-copy path wants SUM
            m.set_force_sum_reduction_for_comms(True)
    return model


@contextlib.contextmanager
def gathered_root(model: nn.Module):
    """Unshard the root's own parameters for calls that bypass its forward (generation, encoding); every rank
    must enter it together."""
    if isinstance(model, FSDPModule):
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
