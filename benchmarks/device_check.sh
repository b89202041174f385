#!/usr/bin/env bash
# One GPU session's checks (under 10 minutes, each step with its own time limit): build the extension for this GPU,
# run the GPU tests, the demo (end-to-end prefill/decode of ZAYA1-8B shapes: transformers, kernelized, modules,
# modules + CUDA graph) and the op benchmarks; everything lands under $OUT (default ./device_out). The AOT compile
# report needs no GPU: CI runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || rocm-smi || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'hip', torch.version.hip)"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
start=$(date +%s)
python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -n 40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python -m zaya_kernels info | tee "$OUT/info.txt"
timeout 150 python -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -n 30
timeout 90 python -m zaya_kernels demo | tee "$OUT/demo.txt"
ops=$(ls benchmarks/bench_*.py | sed 's|benchmarks/bench_||; s|\.py||' | grep -v '^model$' | sed 's/^/--only /' | tr '\n' ' ')
timeout 90 python benchmarks/run.py $ops --out "$OUT/results/ops" | tee "$OUT/bench_ops.txt"
timeout 120 python benchmarks/run.py --only model --out "$OUT/results/model" | tee "$OUT/bench_model.txt"
echo "total: $(( $(date +%s) - start )) s"
