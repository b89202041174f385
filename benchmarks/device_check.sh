#!/usr/bin/env bash
# One GPU session's checks (under 8 minutes): build the extension for this GPU, run the GPU tests, the benchmarks and
# the AOT report; everything lands under $OUT (default ./device_out).
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
timeout 300 python -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -n 30
timeout 120 python -m zaya_kernels demo | tee "$OUT/demo.txt"
timeout 180 python benchmarks/run.py --out "$OUT/results" | tee "$OUT/bench.txt"
timeout 120 python -m zaya_kernels aot-report --json > "$OUT/aot_report.json"; echo "aot-report exit $?"
echo "total: $(( $(date +%s) - start )) s"
