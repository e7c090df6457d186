#!/usr/bin/env bash
# On a GPU machine: the attention variant sweep, bf16 correctness of every fused op at full size, then every
# benchmark in one run. Writes raw JSON and a markdown summary (device, commit, date, command) to $OUT (default
# benchmarks/results/raw); the sweep writes its own $OUT/sweep/sweep.{json,md} and stops itself after
# SWEEP_LIMIT seconds (default 330; killed at SWEEP_LIMIT + 90).
#   bash scripts/gpu_check.sh
# Needs torch + triton with CUDA, and pytest, hypothesis, pytest-benchmark, tokenizers, pillow, tqdm, safetensors,
# xxhash (checkpoint checksums).
# On an offline machine, download those wheels elsewhere into ./wheels (`pip download -d wheels ...`): they are
# installed from there first.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d wheels ]; then
  ${PYTHON:-python} -m pip install -q --no-index --find-links wheels \
    pytest hypothesis pytest-benchmark tokenizers pillow tqdm safetensors xxhash || echo "some wheels missing; going on"
fi
OUT=${OUT:-benchmarks/results/raw}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
PY=${PYTHON:-python}
nvidia-smi -L | tee "$OUT/device.txt"
# First: it compiles every variant's kernels in parallel into Triton's cache, which the variant tests then reuse.
SWEEP_LIMIT=${SWEEP_LIMIT:-330}
timeout $(( SWEEP_LIMIT + 90 )) $PY benchmarks/sweep_attention.py --out "$OUT/sweep" --time-limit "$SWEEP_LIMIT" \
  2>&1 | tee "$OUT/sweep.txt"
sweep_rc=${PIPESTATUS[0]}
$PY -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
$PY -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}
$PY benchmarks/summarize.py "$OUT/bench.json" --command "bash scripts/gpu_check.sh" > "$OUT/summary.md"
cat "$OUT/summary.md"
exit $(( tests_rc || bench_rc || sweep_rc ))
