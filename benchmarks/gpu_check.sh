#!/usr/bin/env bash
# The GPU checks of issue #15, on a machine with CUDA: the tests marked `gpu` (bf16 against fp32,
# both mixings, dispatch against dense, one training step, the worker serving a route), then the
# Arrow benchmark on cuda. Run from the repository root after the README's test setup:
#
#     bash benchmarks/gpu_check.sh [--experts 64,256,1024] > gpu_check.txt
#
# Without CUDA it stops at once, saying so (the tests themselves skip with that reason).
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--experts 64,256,1024)
python -m pytest -q -m gpu tests/gpu -rs
python benchmarks/bench_arrow.py --device cuda --methods base,lorlib_arrow,lorlib_arrow_dense,peft_arrow "${args[@]}"
