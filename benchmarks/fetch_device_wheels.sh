#!/usr/bin/env bash
# Run here (with network), before a device call: the GPU image has an older transformers than the one this repository
# is tested with (its ZAYA model and cache API moved), so carry the local version as a wheel in .whl/ (git-ignored
# through .git/info/exclude; name ".whl" in the call's `carry`). benchmarks/device_check.sh installs it. Also a
# setuptools >= 77, which pyproject.toml's SPDX license string needs, in case the image's is older.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
version=$(python3 -c "import transformers; print(transformers.__version__)")
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "transformers==$version" "setuptools>=77"
ls -l .whl
