#!/usr/bin/env bash
# Builds ops._C (the compiled multi-scale deformable attention kernels) in place.
# Extra arguments are passed to setup.py, e.g. `ops/make.sh --force`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" ops/setup.py build_ext --inplace "$@"
