#!/usr/bin/env bash
# The one GPU run for the fast-path targets (Llama-3.2-1B shapes, 16 pairs per step): tests/test_gpu.py, then every
# system of the llama1b preset, one process each, the table and JSON in $OUT. Prepare first on the development machine:
#     bash bench/gpu_wheels.sh
# then run through the device tool:  command "bash bench/gpu.sh", carry [".whl"], timeout_s 590.
# The bench rewrites its JSON after every system, so a run cut short still returns what it measured.
set -uo pipefail
OUT=${OUT:-bench/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__)"
# First the GPU-only exactness check (FlexAttention training against the padded path, fp32), then the benchmark.
timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
timeout 420 python3 bench/bench_dpo.py --preset llama1b --out "$OUT/llama1b.json" "$@" 2>&1 | tee "$OUT/log.txt"
