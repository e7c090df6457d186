"""Process group, device mesh and the FSDP2 wrapping of GenLIP.

Launch with torchrun (``torchrun --nproc_per_node=8 -m genlip_fast.train ...``, or ``srun torchrun ...`` on
Slurm; ``scripts/slurm/train.sbatch``): it sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE and the
rendezvous. A plain ``python -m genlip_fast.train`` is a one-process group (an in-memory store), so the same FSDP2
code path runs everywhere.

The data-parallel mesh is ``replicate × shard`` (``parallel.replicate``, ``parallel.shard``; default: shard over
the GPUs of a node, replicate across nodes). With one replica it is plain FSDP on a 1-D mesh; with more it is
HSDP: parameters and gradients are sharded inside a shard group (all-gather and reduce-scatter over NVLink) and
the gradient shards are all-reduced across replicas (one inter-node all-reduce of 1/shard of the gradients).
Ranks ``r·shard … r·shard + shard - 1`` form replica ``r`` (torchrun numbers the ranks of a node consecutively).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import weakref
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from . import watch
from .config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    """The data-parallel mesh: 1-D ``("shard",)`` with one replica, else 2-D ``("replicate", "shard")``."""
    owns_group: bool
    """True when this module created the process group (and so destroys it)."""
    replicate: int = 1
    """Model replicas (HSDP's outer dimension; usually the number of nodes)."""
    shard: int = 1
    """Ranks each replica's parameters, gradients and optimizer state are sharded over (usually a node's GPUs)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def mesh_desc(self) -> str:
        kind = "FSDP" if self.replicate == 1 else "HSDP"
        return f"{kind}: {self.replicate} replica(s) x {self.shard} shard(s)"


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but no CUDA device is visible")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def mesh_shape(world_size: int, *, replicate: int = 0, shard: int = 0,
               local_world_size: int | None = None) -> tuple[int, int]:
    """``(replicate, shard)`` of the data-parallel mesh; 0 means "derive it".

    Both 0: shard = the ranks on one node (``local_world_size``, torchrun's LOCAL_WORLD_SIZE), replicate = the
    nodes. One given: the other is the world size divided by it. The product must be the world size.
    """
    if replicate < 0 or shard < 0:
        raise ConfigError(f"parallel.replicate ({replicate}) and parallel.shard ({shard}) must be >= 0 (0 = auto)")
    if replicate == 0 and shard == 0:
        local = local_world_size or world_size
        if world_size % local:
            raise ConfigError(f"{world_size} ranks are not a whole number of nodes of {local} (LOCAL_WORLD_SIZE); "
                              f"set parallel.replicate and parallel.shard")
        shard = local
    if replicate == 0:
        replicate = world_size // shard if world_size % shard == 0 else 0
    if shard == 0:
        shard = world_size // replicate if world_size % replicate == 0 else 0
    if replicate * shard != world_size:
        raise ConfigError(f"parallel.replicate ({replicate or '?'}) x parallel.shard ({shard or '?'}) must equal the "
                          f"world size {world_size}")
    return replicate, shard


def build_mesh(device_type: str, replicate: int, shard: int, timeout: timedelta | None = None) -> DeviceMesh:
    """The data-parallel mesh over all ranks (every rank calls it). Its groups are made here, with ``timeout``:
    ``init_device_mesh`` would give them the backend's default timeout, not the one asked for."""
    world = dist.get_world_size()
    if replicate == 1:
        return DeviceMesh.from_group(dist.group.WORLD, device_type, mesh_dim_names=("shard",))
    ranks = torch.arange(world).view(replicate, shard)
    mine = divmod(dist.get_rank(), shard)
    groups = {}
    for name, rows in (("replicate", ranks.t()), ("shard", ranks)):
        for i, row in enumerate(rows.tolist()):  # every rank creates every group, in the same order
            g = dist.new_group(row, timeout=timeout)
            if i == (mine[1] if name == "replicate" else mine[0]):
                groups[name] = g
    return DeviceMesh.from_group([groups["replicate"], groups["shard"]], device_type, mesh=ranks,
                                 mesh_dim_names=("replicate", "shard"))


def init_distributed(device_name: str = "auto", backend: str = "auto", *, replicate: int = 0, shard: int = 0,
                     timeout_s: float | None = None) -> DistInfo:
    """Join (or create) the process group; one process per GPU. Returns this rank's view, with the
    ``replicate × shard`` mesh (see :func:`mesh_shape`). ``timeout_s`` bounds every collective of the groups made
    here (None: the backend's default); a rank that makes no progress for 90% of it logs which ranks are behind
    (:mod:`~genlip_fast.train.watch`)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    global _LAUNCH_STORE
    owns = False
    store = None
    if not dist.is_initialized():
        owns = True
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            store, rank, world = next(dist.rendezvous("env://"))
            _LAUNCH_STORE = store
            # torchrun's store outlives a restart: keep each attempt's keys (peer addresses, barrier counters)
            # apart, or a restarted rank can read a dead peer's address and fail to connect.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"genlip_attempt_{attempt}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
        else:  # a plain single process: an in-memory store, no network
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    try:
        R, S = mesh_shape(world, replicate=replicate, shard=shard, local_world_size=local_world)
    except ConfigError:  # every rank finds it alike: leave no process group behind
        if owns:
            dist.destroy_process_group()
        raise
    if owns and store is not None and world > 1 and timeout_s:
        watch.start(watch.ProgressWatch(store, rank, world, timeout_s))
    mesh = build_mesh(device.type, R, S, timeout)
    return DistInfo(rank, world, local_rank, device, mesh, owns, R, S)


def shutdown(info: DistInfo) -> None:
    global _LAUNCH_STORE
    if info.owns_group:
        watch.start(None)
        _LAUNCH_STORE = None
        destroy_process_group()


_LAUNCH_STORE: dist.Store | None = None
"""The launcher's store, when there is one: torchrun's, shared by every node. It outlives a restart of the workers,
not the launch: with the c10d or static rendezvous (torchrun's default, ``--standalone``, the Slurm script) it lives
in a torchrun process, so a new torchrun in the same out_dir starts without an earlier run's stop record."""
STOP_KEY = "genlip_stopped"


def record_stop(code: int) -> None:
    """Rank 0, after a stop signal ended the run with exit status ``code``: tell the workers torchrun may restart
    (it restarts workers that exit non-zero) that the stop stands (:func:`stop_recorded`)."""
    if _LAUNCH_STORE is not None:
        try:
            _LAUNCH_STORE.set(STOP_KEY, str(code))
        except Exception as e:  # noqa: BLE001 - the launcher is gone (its death is what stopped us): no restart
            log.debug("could not record the stop: %s", e)


def stop_recorded() -> int | None:
    """The exit status of a stop recorded by an earlier attempt of this launch (None: none; every rank sees the
    same)."""
    if _LAUNCH_STORE is not None and _LAUNCH_STORE.check([STOP_KEY]):
        return int(_LAUNCH_STORE.get(STOP_KEY))
    return None


def destroy_process_group() -> None:
    """``dist.destroy_process_group()`` with the garbage collected on both sides of it.

    An FSDP2 model sits in reference cycles (its hooks and states refer back to it) that hold the process groups'
    objects. Left to the interpreter's final collection they are torn down after the runtime they need: a 2-rank
    gloo run that had finished its work aborted at exit ("terminate called without an active exception", exit -6,
    no Python frame left) in 4 of 25 runs of ``tests/test_train_step.py``'s 2-rank worker; with these collections
    0 of 30 (and 0 of 15 each with either one alone; 2-core CPU machine, torch 2.13, 2026-11-27). Callers that keep a
    model past this call collect again once they drop it (``python -m genlip_fast.train`` does, before it exits)."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


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


_RESHARD_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""root module -> [(FSDP unit, reshard after forward on the last micro-step)], for :func:`prepare_micro_step`."""


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy, *,
               reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 (1-D mesh) or HSDP (2-D ``replicate × shard`` mesh): ``fully_shard`` each block, then the root
    (embeddings, final norm and LM head stay in the root's group). Gradients are reduced as a plain sum: the loss is
    already divided by the global loss-token count.

    Resharding: a block frees its gathered parameters after its forward (``reshard_after_forward``) and gathers
    them again in backward — except the last block, whose backward follows its forward at once, and the root, whose
    LM head runs last in forward and first in backward. Prefetch: each block's forward issues the next block's
    all-gather and its backward the previous block's, and the root's forward issues the first block's, so the CPU
    queues each all-gather one unit ahead (explicit, so recomputed forwards under activation checkpointing do not
    reorder the backward prefetch). Call :func:`prepare_micro_step` before every forward.
    """
    blocks = list(model.blocks)
    plan = []
    for i, block in enumerate(blocks):
        reshard = reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
        plan.append((block, reshard))
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    plan.append((model, False))
    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch([blocks[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([blocks[i - 1]])
    if blocks:
        model.set_modules_to_forward_prefetch([blocks[0]])
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            # plain SUM collectives: gloo has no pre-multiplied sum, and NCCL's zero-copy path wants SUM
            m.set_force_sum_reduction_for_comms(True)
    _RESHARD_PLANS[model] = plan
    return model


def prepare_micro_step(model: nn.Module, micro_step: int, micro_steps: int) -> None:
    """FSDP2's policy for micro-step ``micro_step`` (0-based) of ``micro_steps`` in one optimizer step; call it
    before that micro-step's forward, on a model wrapped by :func:`apply_fsdp`.

    Between micro-steps nothing is resharded or reduced: parameters stay gathered from the first forward on, and
    gradients accumulate unsharded on each rank. The last micro-step applies the per-block reshard-after-forward
    policy, then reduce-scatters each unit's gradients in backward (and, for HSDP, all-reduces the shards across
    replicas; ``set_requires_gradient_sync`` switches both) and reshards. So each step all-gathers every unit in
    the first forward and, if it reshards after forward, once more in the last backward, and reduces every
    gradient once — the same collectives in the same order whatever the number of micro-steps, so ranks may run
    different numbers of them. Memory: full parameters (param dtype) and full gradients (fp32) during the step.
    """
    last = micro_step == micro_steps - 1
    for module, reshard in _RESHARD_PLANS[model]:
        module.set_reshard_after_forward(reshard and last, recurse=False)
    model.set_requires_gradient_sync(last)
    model.set_reshard_after_backward(last)
    watch.mark(f"forward of micro-step {micro_step + 1}/{micro_steps}")


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
        watch.mark("all_reduce")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        watch.mark("barrier")
        dist.barrier()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        watch.mark("all_gather")
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        watch.mark("broadcast")
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
