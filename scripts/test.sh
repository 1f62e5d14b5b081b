#!/usr/bin/env bash
# Sets up a virtual environment (once) and runs the test suite: the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh && setup_venv dev
export CUDA_VISIBLE_DEVICES="" TF_CPP_MIN_LOG_LEVEL=3
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
