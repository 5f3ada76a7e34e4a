#!/usr/bin/env bash
# Wheels the GPU machine lacks, for `bench/gpu.sh`: TRL and the library versions this repo is tested with (the GPU
# machine's image has PyTorch and an older transformers, no TRL, no datasets; its Python is 3.12). Run here, on the
# development machine; .whl/ is kept out of git and travels to the GPU machine as a carried path.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl trl==1.16.0 transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh .whl && ls .whl
