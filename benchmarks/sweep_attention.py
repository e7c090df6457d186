"""One-call GPU sweep: every kernel variant of the fused attention on the packs the model trains on, beside
FlexAttention (the project's ``impl="flex"``) and FlashAttention-4's varlen call when it is importable.

    python benchmarks/sweep_attention.py --out DIR [--time-limit 330] [--variants default,hd80+rope_once]
                                         [--shapes so16_stage1] [--jobs 14] [--no-precompile]
    python benchmarks/sweep_attention.py --dry-run --out DIR     # CPU: Triton interpreter, tiny packs (CI)

Shapes: stage-1 So/16 (16 heads x 72, ~59 samples of ~270 tokens in 16,384), stage-1 L/16 (16 x 64) and stage-2
So/16 (16-1024 patches + 100-500 text per sample), stage-1 qwen3_0.6b (16 query heads on 8 key/value heads of
128), bf16, q/k/v/gate as slices of one projection, MRoPE interleaved,
elementwise gate (``bench_attention.make_pack``). Modes: ``fwd`` and ``fwd_bwd``. Per row: median ms (CUDA
events), useful TFLOP/s (unmasked query-key pairs only: 4·D·H·pairs forward, 3.5x that forward + backward, for
every implementation alike), peak memory above the inputs, the configs the autotuner chose, the first call's
time (compile + autotune) per variant and head dim, the largest difference to the default variant's output and
gradients, and for forward + backward whether two runs agree bitwise (the ``onepass`` atomics need not).

Before timing, every variant's kernels are compiled in ``--jobs`` worker processes into Triton's disk cache (the
same launches the op makes, captured with ``launch.capture_launches``), so the timed process only loads them.
Rows go to ``DIR/sweep.json`` and ``DIR/sweep.md`` as they are measured: a time-out loses the row in flight, not
the table. ``--time-limit`` stops starting new rows after that many seconds; the winner per shape is printed and
written at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {
    "so16_stage1": dict(stage="stage1", heads=16, head_dim=72, section=(12, 12, 12)),
    "l16_stage1": dict(stage="stage1", heads=16, head_dim=64, section=(8, 12, 12)),
    "so16_stage2": dict(stage="stage2", heads=16, head_dim=72, section=(12, 12, 12)),
    # qwen3_0.6b: 16 query heads on 8 key/value heads (grouped-query attention) of 128
    "qwen3_stage1": dict(stage="stage1", heads=16, kv_heads=8, head_dim=128, section=(16, 24, 24)),
}
# Each variant alone, then the combinations a winner would be made of. The default first: the others are
# compared with it.
VARIANTS = ["default", "hd80", "rope_once", "fit_tiles", "tile_list", "rope_once+onepass", "hd80+rope_once",
            "hd80+rope_once+onepass", "hd80+fit_tiles+tile_list", "hd80+rope_once+fit_tiles+tile_list",
            "hd80+rope_once+fit_tiles+tile_list+onepass"]
BASELINES = ["flex", "fa4"]
MODES = ["fwd", "fwd_bwd"]
TINY = dict(total=64, heads=1)  # --dry-run packs


def _pack(shape: str, dry_run: bool):
    from bench_attention import make_pack

    kw = dict(SHAPES[shape])
    if dry_run:
        kw.update(TINY, device="cpu", dtype=__import__("torch").float16, tiny=True)
        if SHAPES[shape].get("kv_heads"):  # grouped-query attention stays grouped: 2 query heads on 1
            kw.update(heads=2, kv_heads=1)
    d = make_pack(**kw)
    d["dout"] = __import__("torch").randn_like(d["q"])  # one upstream gradient per pack: rows compare gradients
    return d


def _attention(impl: str, variant: str, d: dict):
    """``f(q, k, v) -> out`` for one implementation on pack ``d``."""
    import torch

    from genlip_fast.ops.prefix_lm_attention import prefix_lm_attention
    from genlip_fast.ops.prefix_lm_attention.variants import use_variant

    kw = dict(gate=d["gate"], position_ids=d["pos"], mrope_section=d["section"])
    if impl == "fused":
        def f(q, k, v):
            with use_variant(variant):
                return prefix_lm_attention(q, k, v, d["cu"], d["pl"], max_seqlen=d["max_seqlen"], impl="triton", **kw)
        return f
    if impl == "flex":
        return lambda q, k, v: prefix_lm_attention(q, k, v, d["cu"], d["pl"], impl="flex", **kw)
    from flash_attn.cute import flash_attn_varlen_func  # fa4: full attention per sample, no rope, no gate

    def fa4(q, k, v):
        out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=d["cu"], cu_seqlens_k=d["cu"],
                                     max_seqlen_q=d["max_seqlen"], max_seqlen_k=d["max_seqlen"])
        return out[0] if isinstance(out, tuple) else out
    torch.cuda.synchronize()
    return fa4


def _unavailable(impl: str, dry_run: bool) -> str | None:
    if impl == "fused":
        return None
    if dry_run:
        return "needs CUDA (dry run)"
    if impl == "fa4":
        try:
            import flash_attn.cute  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means: not available here
            return f"flash_attn.cute not importable: {type(e).__name__}: {e}"[:160]
    return None


# ----------------------------------------------------------------------------------------------- measuring


class Timer:
    """``(median ms, peak memory GiB above the start, the last result)`` of ``fn``: CUDA events on a GPU; one
    run on CPU."""

    def __init__(self, cuda: bool, reps: int):
        self.cuda, self.reps = cuda, reps

    def __call__(self, fn):
        import torch

        if not self.cuda:
            t0 = time.perf_counter()
            result = fn()
            return (time.perf_counter() - t0) * 1e3, None, result
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        times = []
        for _ in range(self.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            result = fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2], peak, result


def _run_once(attn, d, leaves, dout, mode):
    """One call: the output (fwd) or output and q/k/v gradients (fwd_bwd)."""
    import torch

    if mode == "fwd":
        with torch.no_grad():
            return [attn(*leaves)]
    out = attn(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, dout))


def _max_diff(a: list, b: list) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def _chosen_configs(d, variant: str) -> str:
    """The autotuner's pick per kernel, found by capturing the launches one call would make."""
    import torch

    from genlip_fast.ops.prefix_lm_attention import function as F, launch as L

    q, k, v = d["q"], d["k"], d["v"]
    with L.capture_launches() as launches:
        out, out_u, lse, q_rot, k_rot = F.prefix_lm_attention_forward(
            q, k, v, d["cu"], d["pl"], d["gate"], d["pos"], list(d["section"]), True, 10000.0, q.shape[-1] ** -0.5,
            d["max_seqlen"], variant)
        F.prefix_lm_attention_backward(torch.empty_like(q), q_rot if q_rot.numel() else q,
                                       k_rot if k_rot.numel() else k, v, out_u, lse, d["cu"], d["pl"], d["gate"],
                                       d["pos"], list(d["section"]), True, 10000.0, q.shape[-1] ** -0.5,
                                       d["max_seqlen"], variant)
    picks = []
    for launch in launches:
        if len(launch.configs) > 1:
            best = getattr(L._autotuner(launch.name, tuple(launch.configs), launch.reset), "best_config", None)
            if best is not None:
                kw = best.kwargs
                picks.append(f"{launch.name} {kw['BLOCK_M']}x{kw['BLOCK_N']} w{best.num_warps} s{best.num_stages}"
                             + (f" r{best.maxnreg}" if best.maxnreg else ""))
    return "; ".join(picks)


# ------------------------------------------------------------------------------------------------ precompile


_MAX_LAUNCHES = 8  # launches of one forward + backward (rope_once+onepass: 2 rotations, fwd, pre, onepass, 2 more)


def _precompile_job(job) -> tuple[str, int, float]:
    """Worker: compile (into Triton's disk cache) every autotune candidate of launch ``index`` of one forward +
    backward of ``variant`` on ``shape`` (one job per launch: the work spreads evenly over the processes)."""
    shape, variant, index = job
    import torch

    from genlip_fast.ops.prefix_lm_attention import function as F, launch as L

    sys.path.insert(0, str(HERE))
    t0 = time.perf_counter()
    d = _pack(shape, dry_run=False)
    q, k, v = d["q"], d["k"], d["v"]
    scale = q.shape[-1] ** -0.5
    with L.capture_launches() as launches:
        out, out_u, lse, q_rot, k_rot = F.prefix_lm_attention_forward(
            q, k, v, d["cu"], d["pl"], d["gate"], d["pos"], list(d["section"]), True, 10000.0, scale,
            d["max_seqlen"], variant)
        F.prefix_lm_attention_backward(torch.empty_like(q), q_rot if q_rot.numel() else q,
                                       k_rot if k_rot.numel() else k, v, out_u, lse, d["cu"], d["pl"], d["gate"],
                                       d["pos"], list(d["section"]), True, 10000.0, scale, d["max_seqlen"], variant)
    if index >= len(launches):
        return f"{shape}/{variant}/{index}", 0, time.perf_counter() - t0
    launch = launches[index]
    for cfg in launch.configs:
        launch.kernel.warmup(*launch.args, grid=(1,), **launch.consts, **cfg.all_kwargs())
    return f"{shape}/{variant}/{index}", len(launch.configs), time.perf_counter() - t0


def precompile(variants: list[str], shapes: list[str], jobs: int, budget_s: float) -> dict:
    """Compile every (head dim, variant) once, in parallel processes; returns what it did and how long it took."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait

    seen, work = set(), []
    for v in variants:
        for s in shapes:
            shape = SHAPES[s]
            # same head dim, same query heads per key/value head, same strides: the same kernels
            key = (shape["head_dim"], shape["heads"] // shape.get("kv_heads", shape["heads"]), v)
            if key not in seen:
                seen.add(key)
                work += [(s, v, i) for i in range(_MAX_LAUNCHES)]
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(_precompile_job, w) for w in work]
    done, pending = wait(futures, timeout=budget_s)
    for f in pending:
        f.cancel()
    pool.shutdown(wait=False, cancel_futures=True)
    kernels, errors = 0, []
    for f in done:
        try:
            kernels += f.result()[1]
        except Exception as e:  # noqa: BLE001 - a failed precompile only means the timed run compiles it
            errors.append(f"{type(e).__name__}: {e}"[:200])
    return dict(precompile_s=round(time.perf_counter() - t0, 1), precompiled_kernels=kernels, jobs=jobs,
                precompile_unfinished=len(pending), precompile_errors=errors)


# --------------------------------------------------------------------------------------------------- output


class Recorder:
    """Writes rows to ``sweep.json`` (rewritten whole, atomically) and ``sweep.md`` (appended) as they come."""

    COLUMNS = ["shape", "impl", "variant", "mode", "median_ms", "tflops", "peak_mem_gib", "first_call_s",
               "max_abs_vs_default", "rerun", "configs", "status"]

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.rows, self.winners = out, meta, [], []
        out.mkdir(parents=True, exist_ok=True)
        lines = ["# Attention variant sweep", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [
            "", "| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
        (out / "sweep.md").write_text("\n".join(lines) + "\n")
        self._dump()

    def _dump(self):
        tmp = self.out / "sweep.json.tmp"
        tmp.write_text(json.dumps(dict(meta=self.meta, rows=self.rows, winners=self.winners), indent=1))
        tmp.replace(self.out / "sweep.json")

    def row(self, **r):
        self.rows.append(r)
        self._dump()
        cells = [r.get(c) for c in self.COLUMNS]
        text = ["" if c is None else f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells]
        with open(self.out / "sweep.md", "a") as f:
            f.write("| " + " | ".join(text) + " |\n")
        print(" | ".join(text), flush=True)

    def finish(self, **meta):
        self.meta.update(meta)
        by = {}
        for r in self.rows:
            if r.get("median_ms") is not None:
                by.setdefault((r["shape"], r["mode"]), []).append(r)
        lines = ["", "## Winner per shape", ""]
        for (shape, mode), rows in by.items():
            fused = [r for r in rows if r["impl"] == "fused"]
            if not fused:
                continue
            best = min(fused, key=lambda r: r["median_ms"])
            ref = {(r["impl"], r["variant"]): r["median_ms"] for r in rows}
            w = dict(shape=shape, mode=mode, variant=best["variant"], median_ms=best["median_ms"],
                     vs_default=_ratio(ref.get(("fused", "default")), best["median_ms"]),
                     vs_flex=_ratio(ref.get(("flex", "-")), best["median_ms"]),
                     vs_fa4=_ratio(ref.get(("fa4", "-")), best["median_ms"]))
            self.winners.append(w)
            line = (f"- {shape} {mode}: **{w['variant']}** {w['median_ms']:.3f} ms "
                    f"({_fmt_x(w['vs_default'])} vs default, {_fmt_x(w['vs_flex'])} vs flex, "
                    f"{_fmt_x(w['vs_fa4'])} vs FA4 full attention)")
            lines.append(line)
            print("winner", line[2:], flush=True)
        lines += ["", *[f"- {k}: {v}" for k, v in meta.items()]]
        with open(self.out / "sweep.md", "a") as f:
            f.write("\n".join(lines) + "\n")
        self._dump()


def _ratio(base, x):
    return None if base is None or not x else base / x


def _fmt_x(r):
    return "n/a" if r is None else f"{r:.2f}x"


def _meta(args) -> dict:
    import torch
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    cuda = torch.cuda.is_available() and not args.dry_run
    return dict(device=torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'unknown'}), "
                                                                 "Triton interpreter",
                torch=torch.__version__, triton=triton.__version__, commit=commit,
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=" ".join([Path(sys.executable).name] + sys.argv))


# ------------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "sweep_out"), help="folder for sweep.json / sweep.md")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; names combine with '+'")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--baselines", default=",".join(BASELINES))
    p.add_argument("--time-limit", type=float, default=330.0, help="start no row after this many seconds")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--jobs", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 2)),
                   help="precompile processes")
    p.add_argument("--no-precompile", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny packs (the CI test)")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is imported
    sys.path.insert(0, str(HERE))
    import torch

    from genlip_fast.ops.prefix_lm_attention.variants import parse_variant

    t_start = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on the GPU machine, or use --dry-run", file=sys.stderr)
        return 2
    variants = list(dict.fromkeys(["default"] + [parse_variant(v).name for v in args.variants.split(",")]))
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"unknown shapes {unknown}; choose from {list(SHAPES)}", file=sys.stderr)
        return 2
    rec = Recorder(Path(args.out), _meta(args))
    if not args.dry_run and not args.no_precompile:
        info = precompile(variants, shapes, args.jobs, budget_s=0.5 * args.time_limit)
        print(f"precompile: {info}", flush=True)
        rec.meta.update(info)
    timer = Timer(cuda=not args.dry_run, reps=args.reps)
    packs, reference, compiled = {}, {}, set()
    order = [("fused", "default")] + [(b, "-") for b in args.baselines.split(",") if b] + [
        ("fused", v) for v in variants if v != "default"]
    stopped = None
    for impl, variant in order:
        reason = _unavailable(impl, args.dry_run)
        for shape in shapes:
            for mode in MODES:
                if time.perf_counter() - t_start > args.time_limit:
                    stopped = f"time limit {args.time_limit:.0f} s reached before {impl}/{variant}/{shape}/{mode}"
                    break
                row = dict(shape=shape, impl=impl, variant=variant, mode=mode)
                if reason:
                    rec.row(**row, status=f"skipped: {reason}")
                    continue
                try:
                    rec.row(**row, **_measure(impl, variant, shape, mode, args, packs, reference, compiled, timer))
                except Exception as e:  # noqa: BLE001 - one failing variant must not end the sweep
                    rec.row(**row, status=f"error: {type(e).__name__}: {e}"[:300])
            if stopped:
                break
        if stopped:
            break
    rec.finish(stopped=stopped or "no", total_s=round(time.perf_counter() - t_start, 1))
    return 0


def _measure(impl, variant, shape, mode, args, packs, reference, compiled, timer) -> dict:
    import torch

    if shape not in packs:
        packs[shape] = _pack(shape, args.dry_run)
    d = packs[shape]
    attn = _attention(impl, variant, d)
    D = d["head_dim"]

    def leaves(grad: bool):
        # q, k, v as views of one projection output (q of one, k and v of another with grouped-query attention),
        # as the model hands them over (strides and all)
        proj = d["proj"].detach().clone().requires_grad_(grad)
        if d["kv"] is None:
            return [proj[..., i * D:(i + 1) * D] for i in range(3)]
        kv = d["kv"].detach().clone().requires_grad_(grad)
        return [proj[..., :D], kv[..., :D], kv[..., D:]]

    dout = d["dout"]
    first_call = None
    kernels = (impl, variant, D, d["heads"] // d["kv_heads"])
    if kernels not in compiled and not args.dry_run:  # the first call compiles (or loads), autotunes
        compiled.add(kernels)
        t0 = time.perf_counter()
        _run_once(attn, d, leaves(True), dout, "fwd_bwd")
        if not args.dry_run:
            torch.cuda.synchronize()
        first_call = round(time.perf_counter() - t0, 2)
    qkv = leaves(mode == "fwd_bwd")
    ms, peak, result = timer(lambda: _run_once(attn, d, qkv, dout, mode))
    fwd_flops = 4 * D * d["heads"] * d["pairs"]
    out = dict(median_ms=ms, tflops=(fwd_flops * (1 if mode == "fwd" else 3.5)) / (ms * 1e-3) / 1e12,
               peak_mem_gib=peak, first_call_s=first_call, status="ok")
    if impl == "fused":
        ref = reference.setdefault((shape, mode), result)
        out["max_abs_vs_default"] = _max_diff(result, ref)
        out["configs"] = _chosen_configs(d, variant) if not args.dry_run else "interpreter"
        if mode == "fwd_bwd" and (not args.dry_run or "onepass" in variant):
            again = _run_once(attn, d, qkv, dout, mode)
            differ = sum(int((x != y).sum()) for x, y in zip(result, again))
            out["rerun"] = ("bitwise equal" if differ == 0
                            else f"{differ} elements differ, max {_max_diff(result, again):.3g}")
    return out


if __name__ == "__main__":
    sys.exit(main())
