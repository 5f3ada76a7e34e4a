#!/usr/bin/env bash
# The project's test command: set up, lint, type-check, then the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests bench
mypy
python -m pytest -q "$@"
