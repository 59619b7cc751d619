#!/usr/bin/env bash
# Run a command on the GPU machine of the `device` tool, whose image has torch + numba-cuda 0.30.4
# but numpy 2.5 (which breaks numba-cuda). Carry a numpy 2.4 wheel in .whl/ (see shared/COURSE.md):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "numpy==2.4.*"
# then:  bash bench/on_device.sh python3 -m bench.run basics --out "$OUT"      (carry: [".whl"])
set -euo pipefail
site=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$site:$PWD" NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0 PYTHONUNBUFFERED=1
exec "$@"
