#!/usr/bin/env bash
# One GPU session's checks in one device call, in priority order under one deadline (DEADLINE seconds from the
# start, default 540: a call may run 600 s): build the extension for this GPU, the GPU tests, the whole-model benchmark
# (prefill 1k/8k, decode batch 1/32: transformers vs kernelized vs modules vs graphed modules), the demo, then the op
# benchmarks one family at a time (attention first, decode cases before prefill), then benchmarks/summarize.py over
# every JSON (tokens/s and decode time shares, router time over the launch floor, MoE dispatch time, TFLOP/s and the
# fraction of peak). Each step has its own limit, cut to what is left of the deadline (20 s kept in reserve: the
# kill-after of a step that ignores SIGINT stays inside the deadline); a step cut short keeps what it wrote (pytest
# gets SIGINT and still writes its XML; run.py rewrites its JSON after every case and on SIGINT). Everything lands
# under $OUT (default ./device_out). The AOT compile report needs no GPU: CI runs it. With device time left for a
# second call, benchmarks/device_tune.sh tunes the MoE decode buckets and attention decode configurations. Where the
# GPU image has no matplotlib, draw the PNGs back here: `python benchmarks/run.py --plot <fetched results>/*/*.json`.
#
# Before the call, on the machine with the network: `bash benchmarks/fetch_device_wheels.sh` puts the transformers
# wheel this repository is tested with into .whl/ (the GPU image's own transformers is older); carry ".whl".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
start=$(date +%s)
DEADLINE=${DEADLINE:-540}
PY=${PY:-python3}  # the GPU image's python3 holds torch; a plain `python` may not exist there

# step LIMIT CMD...: run CMD with at most LIMIT seconds, or what is left before the deadline (20 s kept in reserve,
# more than the 15 s kill-after)
step() {
  local limit=$1 left
  shift
  left=$(( DEADLINE - ($(date +%s) - start) - 20 ))
  if (( left < 5 )); then echo "== skipped (deadline): $*"; return 124; fi
  (( left < limit )) && limit=$left
  echo "== $* (limit ${limit} s, at $(( $(date +%s) - start )) s)"
  timeout -s INT -k 15 "$limit" "$@"
}

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || rocm-smi || true
if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda, 'hip', torch.version.hip)"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
step 240 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -n 40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
"$PY" -m zaya_kernels info | tee "$OUT/info.txt"
# 8 workers: the time is mostly Triton compiling the kernels, on the CPU cores
step 150 "$PY" -m pytest -q -m gpu tests -n 8 -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -n 40
step 110 "$PY" benchmarks/run.py --only model --out "$OUT/results/model" | tee "$OUT/bench_model.txt"
step 70 "$PY" -m zaya_kernels demo | tee "$OUT/demo.txt"
for family in attention moe cca router residual_rmsnorm; do
  limit=45
  [[ $family == attention ]] && limit=75  # 16 decode caches (up to 34 GB each) before the prefill cases
  [[ $family == moe ]] && limit=60  # T up to 64k, 5 providers per forward and forward + backward
  step $limit "$PY" benchmarks/run.py --only "$family" --out "$OUT/results/$family" | tee "$OUT/bench_$family.txt"
done
"$PY" benchmarks/summarize.py "$OUT/results" | tee "$OUT/summary.txt"
echo "total: $(( $(date +%s) - start )) s"
