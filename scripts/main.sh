#!/usr/bin/env bash
# The main job: the paper's controlled-sentiment experiment (IMDb) in miniature, on CPU (8.5 min on 2 quiet cores,
# longer on shared ones).
# Trains pi_SFT, a sentiment reward, samples preference pairs, runs DPO over several beta, PPO and the baselines, and
# writes runs/demo/frontier.png, results.json, results.csv and report.md. Stages are cached: rerun to resume.
# Pass --quick for a smaller version (under 2 minutes; README, Measured).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
dpokit demo "$@"
