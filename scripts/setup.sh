#!/usr/bin/env bash
# Set up this checkout for use and development: Python build tools, Triton, the package (editable) with its test
# and benchmark extras. With --toolchains, also the GPU cross-compilers the compile checks use (clang-19 for gfx942,
# clang-22 for gfx950, the HIP headers and ROCm device libs via apt, needs root; nvcc is expected at /usr/local/cuda).
#
# torch: an installed torch (CPU, CUDA or ROCm) is kept. Without one, torch==2.13.0 (the CPU build) is installed:
# an unpinned torch would pull a multi-GB CUDA build. Triton (where none is importable), transformers and the test
# tools install at the versions in scripts/constraints.txt, the ones CI last passed with (ZAYA_UNPINNED=1: newest).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--toolchains" ]; then
  if command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-19 lld-19 clang-22 libamdhip64-dev rocm-device-libs \
      >/dev/null
  else
    echo "setup.sh: no apt-get here: install clang-19, lld-19, clang-22, libamdhip64-dev and rocm-device-libs" \
      "yourself" >&2
  fi
fi

python -m pip install -q --upgrade pip
constraints=(-c scripts/constraints.txt)
[ "${ZAYA_UNPINNED:-0}" = "1" ] && constraints=()
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# numpy before the build too: setup.py imports torch, which warns without it
python -m pip install -q "setuptools>=77" wheel ninja numpy
# ROCm torch ships Triton as pytorch-triton-rocm: install PyPI's triton only where none is importable.
python -c "import triton" 2>/dev/null || python -m pip install -q "${constraints[@]}" triton
python -m pip install -q --no-build-isolation "${constraints[@]}" -e ".[test,bench]"
python -m zaya_kernels info
