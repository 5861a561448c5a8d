#!/usr/bin/env bash
# The GPU checks of issues #15 and #32, on a machine with CUDA, in under 8 minutes on one H100:
#
#   1. the tests marked `gpu` (bf16 against fp32, both mixings, dispatch against dense, one
#      training step, the worker serving a route on cuda): about 1 minute;
#   2. benchmarks/bench_gpu.py --device cuda: Arrow at Llama-2-7B's and SmolLM2-135M's shapes
#      with random weights, base / lorlib / PEFT at 64, 256 and 1,024 experts, and the bf16
#      routing agreement, inside a wall-clock budget (what would not fit is skipped with a note);
#   3. benchmarks/bench_arrow.py --device cuda, only when the embedded SmolLM2 checkpoint is
#      already in lorlib's cache and time is left: it needs the real model, which a machine with
#      no network cannot fetch, and step 2's 135m shape measures the same at that size.
#
#     bash benchmarks/gpu_check.sh [OUTDIR]    # OUTDIR, else $OUT, else benchmarks/out/gpu
#
# Writes OUTDIR/gpu_check.log (everything printed), env.txt, bench_gpu.md and bench_gpu.json
# (and bench_arrow.md when step 3 runs). Each step runs under a time limit; one that fails or
# times out is logged and the next still runs. No gradio is needed: the worker runs without the
# app. Without CUDA it stops at once, saying so. GPU_CHECK_SECONDS (default 450) is the limit.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out="${1:-${OUT:-benchmarks/out/gpu}}"
limit="${GPU_CHECK_SECONDS:-450}"
mkdir -p "$out"

failed=()
step() { # step NAME SECONDS COMMAND...: run it under a time limit, log how it ended, go on
    local name=$1 seconds=$2 rc
    shift 2
    echo "== $name: start at ${SECONDS} s, limit ${seconds} s"
    timeout --signal=INT --kill-after=20 "$seconds" "$@"
    rc=$?
    echo "== $name: exit $rc at ${SECONDS} s$([ $rc -eq 124 ] && echo ' (timed out)')"
    [ $rc -eq 0 ] || failed+=("$name (exit $rc)")
}

main() {
    python - >"$out/env.txt" <<'PY'
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda: available, {p.name}, {p.total_memory / 2**30:.1f} GiB")
else:
    print("cuda: none (torch.cuda.is_available() is False)")
for name in ("transformers", "peft", "safetensors", "accelerate", "numpy", "numba", "scipy", "pandas",
             "pyarrow", "regex", "yaml", "tqdm", "pytest", "pytest_timeout"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:
        print(f"{name} MISSING ({type(exc).__name__})")
PY
    cat "$out/env.txt"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    if ! grep -q "^cuda: available" "$out/env.txt"; then
        echo "gpu_check: no CUDA GPU here; nothing to check (blocked)"
        return 1
    fi

    step "gpu tests" 200 python -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rs

    local left=$((limit - SECONDS))
    if [ $left -gt 150 ]; then
        # the budget leaves a minute for imports, the last step's overrun and writing
        step "bench_gpu" $((left - 10)) python benchmarks/bench_gpu.py --device cuda --rounds 3 \
            --budget-s $((left - 75)) --out "$out/bench_gpu.md"
    else
        echo "== bench_gpu: skipped, only ${left} s left of ${limit} s"
        failed+=("bench_gpu (no time left)")
    fi

    left=$((limit - SECONDS))
    local embedded="${LORLIB_CACHE:-$HOME/.cache/lorlib}/models/SmolLM2-135M-Instruct/model.safetensors"
    if [ ! -f "$embedded" ]; then
        echo "== bench_arrow: skipped, the embedded checkpoint is not cached here ($embedded)"
    elif [ $left -lt 240 ]; then
        echo "== bench_arrow: skipped, only ${left} s left of ${limit} s"
    else
        step "bench_arrow" $((left - 10)) python benchmarks/bench_arrow.py --device cuda --experts 64,256 \
            --methods base,lorlib_arrow,peft_arrow --peft-up-to 64 --out "$out/bench_arrow.md"
    fi

    echo "gpu_check: done in ${SECONDS} s; $([ ${#failed[@]} -eq 0 ] && echo 'every step passed' || echo "failed: ${failed[*]}")"
    [ ${#failed[@]} -eq 0 ]
}

main 2>&1 | tee "$out/gpu_check.log"
