#!/usr/bin/env bash
# The GPU runs, one device call each (at most 10 minutes). Prepare first on the development machine:
#     bash bench/gpu_wheels.sh
# then run through the device tool, command "PARTS='...' bash bench/gpu.sh", carry [".whl"], timeout_s 590:
#     PARTS="tests fastpath"  (the default, ~9.5 min) tests/test_gpu.py (FlexAttention training against the padded
#                             path; FSDP2 at world size 1 with FlexAttention, and with CPU offload, against the
#                             unwrapped step), then every system of bench_dpo.py's llama1b preset
#     PARTS="fsdp"            (~4 min) bench_scale.py: the llama1b preset under FSDP2 at world size 1 against no
#                             wrapping (bench/results/llama1b-scale.json)
#     PARTS="fit"             (~9 min, a call of its own) bench_scale.py: the largest Llama shape (8B, else 3B, else
#                             1B; FIT_SIZES='["3b"]' to start lower) whose full-parameter DPO step (random init, bf16
#                             weights, 8 pairs of U[64,512] tokens, reference copy, activation checkpointing) fits one
#                             GPU with FSDP2 offloading parameters, gradients and optimizer state to CPU memory
#                             (an 8B policy and its reference take ~32 GiB there, AdamW's state 32 GiB more)
# Tables and JSON land in $OUT; the benches rewrite their JSON after every system, so a run cut short keeps what it
# measured.
set -uo pipefail
OUT=${OUT:-bench/results}
PARTS=${PARTS:-tests fastpath}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 BENCH_TMP=${BENCH_TMP:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
free -g | tee -a "$OUT/gpu.txt"
python3 -c "import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__)"
for part in $PARTS; do
    case $part in
        tests) timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt" ;;
        fastpath) timeout 420 python3 bench/bench_dpo.py --preset llama1b --out "$OUT/llama1b.json" "$@" 2>&1 \
            | tee "$OUT/log.txt" ;;
        fsdp) timeout 300 python3 bench/bench_scale.py --preset llama1b --out "$OUT/llama1b-scale.json" 2>&1 \
            | tee "$OUT/scale_log.txt" ;;
        fit) free -g; timeout 570 python3 bench/bench_scale.py --preset fit --timeout 480 \
            --overrides "{\"sizes\": ${FIT_SIZES:-[\"8b\", \"3b\", \"1b\"]}}" --out "$OUT/fit-scale.json" 2>&1 \
            | tee "$OUT/fit_log.txt" ;;
        *) echo "unknown part $part (tests, fastpath, fsdp, fit)" && exit 2 ;;
    esac
done
