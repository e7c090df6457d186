"""What the compiler says about the fused attention on an H100 (sm_90), without a GPU.

For each variant, head dim and dtype it captures every launch the op makes on a full 16K pack (the model's
layout: q and the gate as views of one projection, k/v/dO contiguous, so Triton specialises the strides exactly as
in training), compiles every autotune candidate with Triton's own runtime specialisation for ``GPUTarget("cuda",
90, 32)``, and re-assembles the PTX with the wheel's ``ptxas -v`` and Triton's flags (checked: the cubin comes out
byte-identical) to read registers and spill bytes. Reported per kernel and config: registers, spill stores/loads
(bytes per thread), shared memory, whether the PTX uses ``wgmma``, and the global load widths.

    python -m genlip_fast.ops.prefix_lm_attention.inspect_sm90 [--variants default,hd80] [--head-dims 72,64]
        [--dtypes bf16] [--heads 16 --kv-heads 8] [--json rows.json] [--jobs 2] [--cold]

Runs Triton with ``TRITON_INTERPRET=0`` (set here before the kernels are imported); nothing touches CUDA.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # noqa: E402 - the kernels are decorated at import: before that
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated (3.9 warns when unset)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one H100 block may use
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def capture(variant: str, head_dim: int, dtype: str, gate: str = "elementwise", rope: bool = True,
            total: int = 16384, heads: int = 16, sample_len: int = 270, prefix: int = 196, kv_heads: int | None = None):
    """Every launch of one forward + backward on a stage-1-like pack, as :class:`launch.Launch` records;
    ``kv_heads`` key/value heads (grouped-query attention; default ``heads``)."""
    import torch

    from . import function as F
    from .launch import capture_launches

    dt = getattr(torch, _DTYPES[dtype])
    T, H, D = total, heads, head_dim
    n = total // sample_len
    cu = torch.arange(n + 1, dtype=torch.int32) * sample_len
    pl = torch.full((n,), prefix, dtype=torch.int32)
    width = 2 * D if gate == "elementwise" else D
    qg = torch.empty(T, H, width, dtype=dt)  # q_proj's output; the gate is its other half (the model's layout)
    q = qg[..., :D]
    g = qg[..., D:] if gate == "elementwise" else torch.empty(T, H, dtype=dt) if gate == "headwise" else None
    H_kv = H if kv_heads is None else kv_heads
    k, v = (torch.empty(T, H_kv, D, dtype=dt) for _ in range(2))
    dout = torch.empty(T, H, D, dtype=dt)
    pos = torch.zeros(3, T, dtype=torch.int64) if rope else None
    section = [D // 2 - 2 * (D // 6), D // 6, D // 6]
    scale = D**-0.5
    with capture_launches() as launches:
        out, out_u, lse, q_rot, k_rot = F.prefix_lm_attention_forward(
            q, k, v, cu, pl, g, pos, section, True, 10000.0, scale, sample_len, variant)
        if q_rot.numel():
            q, k = q_rot, k_rot
        F.prefix_lm_attention_backward(dout, q, k, v, out_u if g is not None else out, lse, cu, pl, g, pos,
                                       section, True, 10000.0, scale, sample_len, variant)
    return launches


def compile_sm90(kernel, args: tuple, kwargs: dict):
    """``triton.compile`` for sm_90 with the specialisation Triton's launcher would give these arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def ptxas_report(ptx: str, cubin: bytes) -> dict:
    """Registers and spill bytes from the wheel's ``ptxas -v`` with Triton's sm_90 flags; ``same_cubin`` says the
    re-assembled binary is the one Triton built (so the numbers are about it)."""
    from triton.backends.nvidia.compiler import get_ptxas  # the binary Triton itself picks for sm_90

    with tempfile.TemporaryDirectory() as d:
        src, obj = Path(d, "k.ptx"), Path(d, "k.cubin")
        src.write_text(ptx)
        cmd = [get_ptxas(90).path, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(src),
               "-o", str(obj)]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        same = obj.read_bytes() == cubin
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(regs.group(1)), spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)),
                same_cubin=same)


def load_widths(ptx: str) -> dict:
    """Global loads in the PTX by bytes per thread and instruction (``cp.async`` counted by its size)."""
    widths: dict[str, int] = {}
    for m in re.finditer(r"ld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[a-z]?(\d+) ", ptx):
        nbytes = int(m.group(1) or 1) * int(m.group(2)) // 8
        widths[f"{nbytes}B"] = widths.get(f"{nbytes}B", 0) + 1
    for m in re.finditer(r"cp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)* \[[^\]]+\], \[[^\]]+\], (\w+)", ptx):
        key = f"cp{int(m.group(1), 0)}B"
        widths[key] = widths.get(key, 0) + 1
    return dict(sorted(widths.items()))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): a compile's cost whatever else the machine
    runs, which wall time on a shared machine is not."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _constexpr_summary(consts: dict) -> str:
    keys = ("SPLIT", "ROPE", "ROW_BOUND", "TILE_LIST", "GATE_MODE", "ALIGN", "INVERSE", "GROUP")
    return " ".join(f"{k}={int(consts[k]) if isinstance(consts[k], bool) else consts[k]}" for k in keys
                    if k in consts)


def inspect_job(job: tuple) -> list[dict]:
    """Rows for one ``(variant, head_dim, dtype[, every_config[, heads, kv_heads]])``: every kernel launch x every
    autotune candidate (or only the first candidate of each, when ``every_config`` is False), on ``heads`` query
    and ``kv_heads`` key/value heads (default 16 and 16)."""
    variant, head_dim, dtype, *rest = job
    every = rest[0] if rest else True
    heads, kv_heads = rest[1:3] if len(rest) >= 3 else (16, 16)
    rows = []
    seen = set()
    for launch in capture(variant, head_dim, dtype, heads=heads, kv_heads=kv_heads):
        for cfg in launch.configs if every else launch.configs[:1]:
            kwargs = {**launch.consts, **cfg.all_kwargs()}
            key = (launch.name, json.dumps({k: str(v) for k, v in kwargs.items()}, sort_keys=True))
            if key in seen:  # e.g. the rotation pass runs twice with the same specialisation
                continue
            seen.add(key)
            t0, c0 = time.perf_counter(), _cpu_seconds()
            compiled = compile_sm90(launch.kernel, launch.args, kwargs)
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            ptx = compiled.asm["ptx"]
            rows.append(dict(
                variant=variant, kernel=launch.name, head_dim=head_dim, dtype=dtype, heads=f"{heads}/{kv_heads}",
                config=f"{cfg.kwargs.get('BLOCK_M', cfg.kwargs.get('BLOCK_T', '-'))}x{cfg.kwargs.get('BLOCK_N', '-')}"
                       f" w{cfg.num_warps} s{cfg.num_stages}" + (f" r{cfg.maxnreg}" if cfg.maxnreg else ""),
                constexprs=_constexpr_summary(launch.consts),
                shared=compiled.metadata.shared, wgmma="wgmma.mma_async" in ptx, loads=load_widths(ptx),
                compile_s=round(seconds, 2), compile_cpu_s=round(cpu, 2), **ptxas_report(ptx, compiled.asm["cubin"]),
            ))
    return rows


def markdown(rows: list[dict]) -> str:
    """One row per distinct compiled kernel (kernel, head dim, dtype, constexprs, config), with the variants that
    launch it."""
    merged: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kernel"], r["head_dim"], r["dtype"], r["constexprs"], r["config"])
        if key not in merged:
            merged[key] = dict(r, variants=[])
        if r["variant"] not in merged[key]["variants"]:
            merged[key]["variants"].append(r["variant"])
    head = ("| kernel | D | dtype | config | constexprs | regs | spill st/ld B | smem KiB | wgmma | global loads "
            "| compile CPU s | variants |")
    lines = [head, "|" + "---|" * 12]
    for r in merged.values():
        loads = " ".join(f"{k}:{v}" for k, v in r["loads"].items())
        lines.append(f"| {r['kernel']} | {r['head_dim']} | {r['dtype']} | {r['config']} | {r['constexprs']} | "
                     f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared'] / 1024:.1f} | "
                     f"{'yes' if r['wgmma'] else 'no'} | {loads} | {r['compile_cpu_s']} | "
                     f"{', '.join(r['variants'])} |")
    return "\n".join(lines)


def run(jobs: list[tuple], workers: int = 2) -> list[dict]:
    """Inspect every job (in worker processes: compiles are CPU-bound); rows in job order."""
    with ProcessPoolExecutor(workers) as pool:
        return [row for rows in pool.map(inspect_job, jobs) for row in rows]


def main(argv=None) -> None:
    from .variants import VARIANTS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (combine with '+')")
    p.add_argument("--head-dims", default="72,64")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (grouped-query attention)")
    p.add_argument("--jobs", type=int, default=2, help="compile processes")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--cold", action="store_true", help="compile into a fresh Triton cache (honest compile times)")
    a = p.parse_args(argv)
    if a.cold:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")
    jobs = [(v, int(d), t, True, a.heads, a.kv_heads or a.heads) for v in a.variants.split(",")
            for d in a.head_dims.split(",") for t in a.dtypes.split(",")]
    t0 = time.perf_counter()
    rows = run(jobs, a.jobs)
    print(markdown(rows))
    spills = sum(1 for r in rows if r["spill_stores"] or r["spill_loads"])
    print(f"\n{len(rows)} launches x candidates inspected, {spills} with spills; {time.perf_counter() - t0:.0f} s wall "
          f"on {a.jobs} processes, {sum(r['compile_cpu_s'] for r in rows):.0f} CPU s of compiling (a kernel already in "
          f"Triton's cache counts ~0)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
