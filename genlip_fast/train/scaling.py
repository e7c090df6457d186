"""What FSDP and HSDP move per optimizer step, and the step time and efficiency that follow.

    python -m genlip_fast.train.scaling --config so16_stage1 --nodes 1,8,64 --gpus-per-node 8 \\
        --intra-gbps 3600 --inter-gbps 3200 [--pack-ms 150 | --mfu 0.4]

**Bytes.** The model follows what :func:`~genlip_fast.train.distributed.apply_fsdp` and
:func:`~genlip_fast.train.distributed.prepare_micro_step` make FSDP2 do in one optimizer step (``tests/test_hsdp.py``
records the collectives of real gloo runs on 1-D and 2-D meshes and checks they equal :func:`step_collectives`).
For each FSDP unit (every block, and the root: patch and text embeddings, final norm, LM head), with ``s`` its
shard size (FSDP2 splits each parameter's dim 0 into ``shard`` chunks of ``ceil(d0 / shard)`` rows, padding the
last), once per step whatever the number of micro-steps:

- all-gather of the parameters in the first forward (``shard·s`` elements of the param dtype: bf16 on GPUs);
- all-gather again in the last backward, for units that reshard after forward (every block but the last);
- reduce-scatter of the gradients after the last backward (``shard·s`` elements of the reduce dtype: fp32);
- HSDP only: all-reduce of the reduced shard (``s`` elements, fp32) across the ``replicate`` replicas.

The optimizer state (AdamW's fp32 moments, like the fp32 master parameters and gradients) is sharded as the
parameters are and never communicated; with HSDP each replica holds its own copy (``replicate`` copies in all).
Collectives over one rank move nothing. The trainer's scalar all-reduces (token counts, loss, grad norm; < 100
bytes) are left out.

**Time.** Each GPU's traffic is that of the bandwidth-optimal ring: an all-gather or reduce-scatter over ``n``
ranks sends (and receives) ``(n-1)/n`` of the gathered buffer, an all-reduce ``2(n-1)/n``. A group inside one node
runs at the per-GPU NVLink bandwidth (``--intra-gbps``); a group that spans nodes is bound by the network, where
all GPUs of a node communicate at once and share its NICs (``--inter-gbps`` per node / GPUs per node). An optional
per-ring-step latency (``--step-latency-us``, default 0: bandwidth only) adds ``(n-1)`` steps per all-gather or
reduce-scatter and ``2(n-1)`` per all-reduce. Compute per pack (forward + backward on one GPU) is ``--pack-ms``
when measured, else the pack's useful FLOPs (:mod:`genlip_fast.train.flops`) at ``--mfu`` of ``--peak-tflops``;
forward is a third of it. Overlap, as FSDP2 schedules it: the root's all-gather opens the step and its gradient
reduction closes it, both exposed; the blocks' forward all-gathers hide behind the first micro-step's forward and
their backward all-gathers and reductions behind the last micro-step's backward, as far as they fit; NVLink and the
network work in parallel. Step time = compute + exposed communication; efficiency = compute / step time, for
communication only: ``fill`` is the share of the busiest GPU's micro-step slots the step's packs fill (547 packs on
512 GPUs: 2 slots each, 53% filled). Not modelled: the optimizer step, data loading, stragglers, congestion, and
NCCL's tree and NVLS algorithms.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from ..model import GenLIP, get_preset
from ..model.config import ModelConfig
from .flops import peak_flops, training_flops

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Unit:
    """One FSDP unit: the shapes of its parameters and whether it reshards after forward."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    reshard_after_forward: bool

    def shard_numel(self, shard: int) -> int:
        """Elements of one rank's padded shard: each parameter's dim 0 cut into ``shard`` chunks of ceil(d0/shard)."""
        total = 0
        for shape in self.shapes:
            rows = shape[0] if shape else 1
            total += math.ceil(rows / shard) * (math.prod(shape) // rows if rows else 0)
        return total

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def fsdp_units(mcfg: ModelConfig, *, reshard_after_forward: bool = True) -> list[Unit]:
    """GenLIP's FSDP units as ``apply_fsdp`` makes them (shapes from a model built on the meta device)."""
    with torch.device("meta"):
        model = GenLIP(mcfg)
    units = []
    in_blocks = set()
    for i, block in enumerate(model.blocks):
        params = list(block.parameters())
        in_blocks.update(id(p) for p in params)
        last = i == len(model.blocks) - 1
        units.append(Unit(f"blocks.{i}", tuple(tuple(p.shape) for p in params), reshard_after_forward and not last))
    root = tuple(tuple(p.shape) for p in model.parameters() if id(p) not in in_blocks)
    units.append(Unit("root", root, False))
    return units


@dataclass(frozen=True)
class Collective:
    """One kind of collective in a step, as each rank of a group issues it."""

    op: str
    """'all_gather' | 'reduce_scatter' | 'all_reduce'."""
    group: str
    """Mesh dim of the group: 'shard' or 'replicate'."""
    group_size: int
    payload_bytes: int
    """The full buffer: gathered output, reduce-scatter input, all-reduced tensor."""
    count: int = 1

    @property
    def ring_steps(self) -> int:
        n = self.group_size - 1
        return 2 * n if self.op == "all_reduce" else n

    @property
    def bytes_per_gpu(self) -> float:
        """Bytes each rank sends (and receives) in all ``count`` calls, on a ring."""
        if self.group_size <= 1:
            return 0.0
        return self.count * self.payload_bytes * self.ring_steps / self.group_size


def step_collectives(units: Sequence[Unit], replicate: int, shard: int, *, param_bytes: int = 2,
                     grad_bytes: int = 4) -> dict[str, list[Collective]]:
    """Per unit name, the collectives one rank issues in one optimizer step (any number of micro-steps)."""
    out: dict[str, list[Collective]] = {}
    for u in units:
        s = u.shard_numel(shard)
        gathers = 2 if u.reshard_after_forward else 1
        colls = [Collective("all_gather", "shard", shard, shard * s * param_bytes, gathers),
                 Collective("reduce_scatter", "shard", shard, shard * s * grad_bytes)]
        if replicate > 1:
            colls.append(Collective("all_reduce", "replicate", replicate, s * grad_bytes))
        out[u.name] = [c for c in colls if c.group_size > 1]
    return out


def summarize(colls: dict[str, list[Collective]]) -> Counter:
    """``{(op, group_size, payload_bytes): calls}`` over all units: the shape a measured run is compared in."""
    total: Counter = Counter()
    for cs in colls.values():
        for c in cs:
            total[(c.op, c.group_size, c.payload_bytes)] += c.count
    return total


# ---- measuring: the collectives a real run issues ------------------------------------------------------------

class CollectiveRecorder(TorchDispatchMode):
    """Records every c10d collective this rank issues while active (FSDP2's included: they go through the
    dispatcher as ``c10d`` ops). ``calls`` is a list of ``(op, group_size, payload_bytes)`` with the payload as in
    :class:`Collective`. Backward runs inside it too on CPU (the autograd engine keeps the dispatch mode)."""

    # the ops FSDP2 and the trainer issue (checked on torch 2.13); an op a later FSDP2 moves to is missed loudly: the
    # comparison with the model fails
    OPS = {"_allgather_base_": "all_gather", "_reduce_scatter_base_": "reduce_scatter", "allreduce_": "all_reduce"}

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and func._opname in self.OPS:
            group = next(a for a in args if isinstance(a, torch.ScriptObject))
            tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
                       if isinstance(t, torch.Tensor)]
            # the largest tensor: the gathered output, the reduce-scatter input, the all-reduced buffer
            payload = max(t.numel() * t.element_size() for t in tensors)
            self.calls.append((self.OPS[func._opname], dist.ProcessGroup.unbox(group).size(), payload))
        return func(*args, **(kwargs or {}))

    def summary(self, *, min_group: int = 2) -> Counter:
        return Counter(c for c in self.calls if c[1] >= min_group)


# ---- time ----------------------------------------------------------------------------------------------------

@dataclass
class Network:
    """The links, in Gb/s (10^9 bits) one way, and an optional latency per ring step."""

    gpus_per_node: int = 8
    """GPUs sharing a node's network."""
    intra_gbps: float = 3600.0
    """Per-GPU NVLink bandwidth, Gb/s (H100 SXM: 450 GB/s each way)."""
    inter_gbps: float = 3200.0
    """Per-node network bandwidth, Gb/s (8 x 400 Gb/s InfiniBand)."""
    step_latency_us: float = 0.0
    """Latency of one ring step, µs (0: bandwidth only)."""

    def seconds(self, c: Collective, spans_nodes: bool) -> float:
        bw = (self.inter_gbps / self.gpus_per_node if spans_nodes else self.intra_gbps) * 1e9 / 8
        return c.bytes_per_gpu / bw + c.count * c.ring_steps * self.step_latency_us * 1e-6


@dataclass
class Prediction:
    layout: str
    gpus: int
    replicate: int
    shard: int
    micro_steps: int
    """Packs (micro-steps) of the busiest GPU: ceil(packs per step / GPUs)."""
    fill: float
    """Packs per step / (GPUs x micro_steps): the share of micro-step slots that hold a pack."""
    compute_s: float
    bytes_nvlink: float
    bytes_network: float
    comm_s: float
    exposed_s: float
    state_gib: float
    """Sharded fp32 parameters + gradients + AdamW moments per GPU."""

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s

    @property
    def efficiency(self) -> float:
        return self.compute_s / self.step_s


PHASES = ("root_gather", "blocks_forward", "blocks_backward", "root_reduce")
"""A step's communication in the order FSDP2 issues it (see :func:`calls_in_phase`)."""


def calls_in_phase(phase: str, unit: str, c: Collective) -> int:
    """Calls of ``c`` (a collective of ``unit``) in ``phase``: the first forward gathers every unit once; the last
    backward gathers again what resharded after forward, and reduces everything."""
    if (unit == "root") != phase.startswith("root"):
        return 0
    if c.op == "all_gather":
        return 1 if phase in ("root_gather", "blocks_forward") else c.count - 1
    return 1 if phase in ("blocks_backward", "root_reduce") else 0


def predict(units: Sequence[Unit], *, nodes: int, net: Network, hsdp: bool, packs_per_step: int, pack_s: float,
            param_bytes: int = 2, grad_bytes: int = 4) -> Prediction:
    """One optimizer step on ``nodes`` x ``net.gpus_per_node`` GPUs: FSDP over all of them (``hsdp=False``) or
    HSDP with a node per replica; ``pack_s`` = forward + backward seconds of one pack on one GPU."""
    gpus = nodes * net.gpus_per_node
    replicate, shard = (nodes, net.gpus_per_node) if hsdp else (1, gpus)
    colls = step_collectives(units, replicate, shard, param_bytes=param_bytes, grad_bytes=grad_bytes)

    def spans_nodes(c: Collective) -> bool:  # a replicate group always; a shard group in 1-D FSDP over nodes
        return c.group == "replicate" or shard > net.gpus_per_node

    on_link = {True: 0.0, False: 0.0}
    for cs in colls.values():
        for c in cs:
            on_link[spans_nodes(c)] += c.bytes_per_gpu

    def seconds(phase: str | None) -> float:
        """Time of one phase (None: all of them), NVLink and network working in parallel."""
        t = {True: 0.0, False: 0.0}
        for unit, cs in colls.items():
            for c in cs:
                n = c.count if phase is None else calls_in_phase(phase, unit, c)
                if n:
                    t[spans_nodes(c)] += net.seconds(dataclasses.replace(c, count=n), spans_nodes(c))
        return max(t.values())

    # the blocks' gathers hide behind the first micro-step's forward (a third of a pack's compute), their backward
    # gathers and reductions behind the last micro-step's backward; the root's open and close the step
    exposed = (seconds("root_gather") + seconds("root_reduce") + max(0.0, seconds("blocks_forward") - pack_s / 3)
               + max(0.0, seconds("blocks_backward") - 2 * pack_s / 3))
    micro = math.ceil(packs_per_step / gpus)
    state = 16 * sum(u.shard_numel(shard) for u in units) / 2**30
    return Prediction("HSDP" if hsdp else "FSDP", gpus, replicate, shard, micro, packs_per_step / (gpus * micro),
                      micro * pack_s, on_link[False],
                      on_link[True], seconds(None), exposed, state)


def packs_per_step(cfg) -> int:
    """The trainer's rule (``step.plan_batch``: exactly this many, not rounded to the GPUs)."""
    t = cfg.train
    if t.packs_per_step > 0:
        return t.packs_per_step
    if t.global_batch_samples > 0 and t.tokens_per_sample > 0:
        return math.ceil(t.global_batch_samples / max(1, math.floor(cfg.data.pack_tokens / t.tokens_per_sample)))
    raise ValueError("the config gives neither train.packs_per_step nor global_batch_samples with tokens_per_sample")


def pack_flops_estimate(mcfg: ModelConfig, cfg) -> float:
    """Useful FLOPs of one pack of the config's mean sample: ``floor(pack_tokens / tokens_per_sample)`` samples of
    ``(image_size / patch)^2`` image tokens and the rest text, every text token carrying the loss."""
    t = cfg.train.tokens_per_sample or 270.0
    per_pack = max(1, math.floor(cfg.data.pack_tokens / t))
    image = (cfg.data.image_size // mcfg.patch_size) ** 2
    text = max(1, round(t) - image)
    return training_flops(mcfg, [image + text] * per_pack, [image] * per_pack, text * per_pack)


def main(argv: list[str] | None = None) -> int:
    from .config import load_config

    ap = argparse.ArgumentParser(prog="python -m genlip_fast.train.scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="so16_stage1",
                    help="bundled preset or TOML path (model and batch); --section.key=value overrides follow")
    ap.add_argument("--nodes", default="1,8,64", help="comma-separated node counts")
    net = Network()
    ap.add_argument("--gpus-per-node", type=int, default=net.gpus_per_node)
    ap.add_argument("--intra-gbps", type=float, default=net.intra_gbps, help="per-GPU NVLink Gb/s, one way")
    ap.add_argument("--inter-gbps", type=float, default=net.inter_gbps, help="per-node network Gb/s, one way")
    ap.add_argument("--step-latency-us", type=float, default=net.step_latency_us,
                    help="latency per ring step (0: bandwidth only)")
    ap.add_argument("--pack-ms", type=float, default=0.0, help="measured fwd+bwd ms of one pack on one GPU")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed MFU when --pack-ms is not given")
    ap.add_argument("--peak-tflops", type=float, default=peak_flops("H100") / 1e12, help="bf16 dense peak")
    ap.add_argument("--param-dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--reduce-dtype", default="fp32", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--no-reshard-after-forward", action="store_true", help="parallel.reshard_after_forward=false")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args, rest = ap.parse_known_args(argv)
    cfg = load_config(args.config, rest)
    over = {k: v for k, v in (("vocab_size", cfg.model.vocab_size), ("gate", cfg.model.gate)) if v is not None}
    mcfg = get_preset(cfg.model.preset, **over)
    units = fsdp_units(mcfg, reshard_after_forward=not args.no_reshard_after_forward)
    if args.pack_ms > 0:
        pack_s, source = args.pack_ms / 1e3, f"measured {args.pack_ms:g} ms/pack"
    else:
        flops = pack_flops_estimate(mcfg, cfg)
        pack_s = flops / (args.mfu * args.peak_tflops * 1e12)
        source = f"{flops / 1e12:.1f} TFLOP/pack at an assumed {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s"
    net = Network(args.gpus_per_node, args.intra_gbps, args.inter_gbps, args.step_latency_us)
    packs = packs_per_step(cfg)
    n_params = sum(u.numel for u in units)
    print(f"{cfg.model.preset}: {n_params / 1e9:.2f}B parameters in {len(units)} FSDP units; {packs} packs of "
          f"{cfg.data.pack_tokens} tokens per step; compute {pack_s * 1e3:.0f} ms/pack ({source}); NVLink "
          f"{args.intra_gbps / 8:g} GB/s per GPU, network {args.inter_gbps / 8:g} GB/s per node "
          f"({args.gpus_per_node} GPUs); params {args.param_dtype}, gradient reduce {args.reduce_dtype}")
    rows = [predict(units, nodes=int(nodes), net=net, hsdp=hsdp, packs_per_step=packs, pack_s=pack_s,
                    param_bytes=DTYPE_BYTES[args.param_dtype], grad_bytes=DTYPE_BYTES[args.reduce_dtype])
            for nodes in args.nodes.split(",") for hsdp in (False, True)]
    print(format_table(rows, markdown=args.markdown))
    return 0


def format_table(rows: Sequence[Prediction], *, markdown: bool = False) -> str:
    head = ["GPUs", "layout", "mesh", "packs/GPU", "fill", "NVLink GB/GPU", "network GB/GPU", "comm ms", "exposed ms",
            "compute ms", "step ms", "efficiency", "state GiB/GPU"]
    body = [[str(p.gpus), p.layout, f"{p.replicate}x{p.shard}", str(p.micro_steps), f"{p.fill:.0%}",
             f"{p.bytes_nvlink / 1e9:.2f}",
             f"{p.bytes_network / 1e9:.2f}", f"{p.comm_s * 1e3:.0f}", f"{p.exposed_s * 1e3:.0f}",
             f"{p.compute_s * 1e3:.0f}", f"{p.step_s * 1e3:.0f}", f"{p.efficiency:.1%}", f"{p.state_gib:.2f}"]
            for p in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in [head, *body])


if __name__ == "__main__":
    sys.exit(main())
