"""Compile-only check of the linear cross entropy kernels for sm_90 (H100), on a machine without a GPU.

The tests here run the kernels in the CPU interpreter, which never lowers them; this file lowers every GPU tile
config the autotuner can pick, for bf16 at the model widths d = 1024 / 1152 / 1536, all the way to a cubin with
ptxas from the Triton wheel, and checks what the interpreter cannot see:

* the kernels compile for ``GPUTarget("cuda", 90, 32)`` at all (no construct the interpreter tolerates but the
  compiler rejects),
* the logits products run on Hopper tensor cores (``wgmma`` in the PTX),
* the pipelined tiles fit in the H100's 227 KB of shared memory per block,
* no register spills (cuobjdump's resource usage reports no stack / local memory), which would make the kernel
  memory-bound.

The test process has ``TRITON_INTERPRET=1`` set (conftest), under which ``@triton.jit`` builds interpreter objects,
so the compile runs in a subprocess with ``TRITON_INTERPRET=0``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
H100_MAX_SHARED = 232_448  # bytes per block with the opt-in carve-out (227 KB)

_SCRIPT = r"""
import importlib, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

K = importlib.import_module("genlip_fast.ops.linear_cross_entropy.kernels")
F = importlib.import_module("genlip_fast.ops.linear_cross_entropy.function")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TARGET = GPUTarget("cuda", 90, 32)
DIV16 = [["tt.divisibility", 16]]
cases = json.loads(sys.argv[1])
out = []


def compile_one(fn, types, constexprs, ints, cfg):
    # Mirror the launcher's runtime specialisation: unit strides become constexprs, pointers and ints divisible by 16
    # carry the divisibility attribute (what Triton would infer from the real tensors).
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): DIV16 for n, t in types.items() if t.startswith("*")}
    attrs.update({(fn.arg_names.index(n),): DIV16 for n, v in ints.items() if v % 16 == 0})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=TARGET, options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    line = next(l for l in usage.splitlines() if "REG:" in l)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return dict(shared=k.metadata.shared, wgmma="wgmma" in k.asm["ptx"], regs=int(fields["REG"]),
                stack=int(fields["STACK"]), local=int(fields["LOCAL"]))


for case in cases:
    dt, d, cfg, bias, softcap = case["dtype"], case["d"], case["cfg"], case["bias"], case["softcap"]
    meta = cfg["kwargs"]
    prec = "ieee" if dt == "fp32" else "tf32"
    common = dict(H=f"*{dt}", W=f"*{dt}", B=f"*{dt}", T="*i64", N="i32", D="i32", softcap="fp32",
                  stride_hn="i32", stride_wv="i32")
    ints = dict(D=d, stride_hn=d, stride_wv=d)
    flags = dict(stride_hd=1, stride_wd=1, HAS_BIAS=bias, HAS_SOFTCAP=softcap, DOT_PRECISION=prec, **meta)
    fwd = compile_one(K._lce_fwd_kernel,
                      dict(common, M_part="*fp32", S_part="*fp32", Z_part="*fp32", V="i32"),
                      dict(flags, CHUNK_V=F._CHUNK_V_GPU), ints, cfg)
    bwd = compile_one(K._lce_bwd_dlogits_kernel,
                      dict(common, Lse="*fp32", G="*fp32", DZ=f"*{dt}", v_lo="i32", v_hi="i32", stride_zn="i32"),
                      dict(flags, stride_zv=1), ints, cfg)
    out.append(dict(case, fwd=fwd, bwd=bwd))

comb = compile_one(K._lce_combine_kernel,
                   dict(M_part="*fp32", S_part="*fp32", Z_part="*fp32", T="*i64", Loss="*fp32", Lse="*fp32",
                        N="i32", NUM_SPLITS="i32", ignore_index="i32"),
                   dict(BLOCK=F._COMBINE_BLOCK), {}, dict(num_warps=4, num_stages=3))
print("RESULT" + json.dumps(dict(cases=out, combine=comb)))
"""


def _cases():
    import importlib

    fn_mod = importlib.import_module("genlip_fast.ops.linear_cross_entropy.function")
    cases = []
    for cfg in fn_mod._gpu_configs():
        c = dict(kwargs=cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        fp32 = cfg.kwargs["BLOCK_D"] == 32  # the same split the launcher's config pruning makes
        if fp32:
            cases.append(dict(dtype="fp32", d=1152, cfg=c, bias=True, softcap=True))
            continue
        for d in (1024, 1152, 1536):
            # The model's call (no bias, no softcap) everywhere; every optional feature on at once once per config.
            cases.append(dict(dtype="bf16", d=d, cfg=c, bias=False, softcap=False))
        cases.append(dict(dtype="bf16", d=1152, cfg=c, bias=True, softcap=True))
    return cases


@pytest.fixture(scope="module")
def compiled():
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas in the Triton wheel or on PATH: the CUDA backend cannot build cubins here")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(_cases())], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_every_config_compiles_for_sm90(compiled):
    assert len(compiled["cases"]) == len(_cases())


def test_half_configs_use_wgmma_and_fit_shared_memory(compiled):
    for case in compiled["cases"]:
        for kernel in ("fwd", "bwd"):
            res = case[kernel]
            assert res["shared"] <= H100_MAX_SHARED, (kernel, case)
            if case["dtype"] != "fp32":
                assert res["wgmma"], (kernel, case)


def test_no_register_spills(compiled):
    for case in compiled["cases"]:
        for kernel in ("fwd", "bwd"):
            res = case[kernel]
            if case["dtype"] == "fp32":
                continue  # fp32 is the exact-precision fallback, not a performance path
            assert res["stack"] == 0 and res["local"] == 0, (kernel, case["cfg"], res)
    assert compiled["combine"]["stack"] == 0
