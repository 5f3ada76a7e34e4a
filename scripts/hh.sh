#!/usr/bin/env bash
# The paper's pipeline (SFT -> DPO) on Anthropic HH with a tiny model, on CPU in a few minutes.
# 1. a small random Llama + a BPE tokenizer trained on the HH data; 2. Preferred-FT (SFT on chosen), which becomes
# pi_ref; 3. DPO against it. Outputs land in runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
HH=../shared/data/hh-rlhf/helpful-base/test.jsonl.gz
dpokit init-model --data "$HH" --out runs/tiny --vocab-size 2048 --hidden-size 128 --layers 2
dpokit sft configs/hh_sft.yaml
dpokit dpo configs/hh_dpo.yaml
python - <<'PY'
import json
s = json.load(open("runs/hh-dpo/summary.json"))
print("DPO on training pairs:", {k: round(v, 4) for k, v in s["train_eval"].items() if k.startswith(("loss", "rewards/"))})
print("DPO held out:         ", {k: round(v, 4) for k, v in s["eval"].items() if k.startswith(("eval/loss", "eval/rewards/"))})
PY
