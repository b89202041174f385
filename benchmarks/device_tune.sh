#!/usr/bin/env bash
# A GPU session's second call, after device_check.sh: time Triton launch configurations on this GPU and propose
# tuned tables (zaya_kernels/tools/tune.py; every candidate compiled without spills for this target, checked
# against the reference, timed with CUDA events; winners also compiled for gfx942/gfx950/sm_90). Needs no extension
# build. Writes $OUT/{moe,attention}_<target>.json and the logs; apply them on the CPU machine by copying over
# zaya_kernels/configs/ (or tune.write_tuned_table when the tables changed meanwhile), then run the AOT report.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
PY=${PY:-python3}
MOE_BUDGET=${MOE_BUDGET:-210}
ATTENTION_BUDGET=${ATTENTION_BUDGET:-150}
"$PY" zaya_kernels/tools/tune.py moe --tokens 1,4,8,64 --budget "$MOE_BUDGET" --max-candidates 12 \
  --out "$OUT/moe_tuned.json" 2>&1 | tee "$OUT/tune_moe.log"
"$PY" zaya_kernels/tools/tune.py attention --kernels decode --budget "$ATTENTION_BUDGET" --max-candidates 16 \
  --out "$OUT/attention_tuned.json" 2>&1 | tee "$OUT/tune_attention.log"
