#!/usr/bin/env bash
# Sets up a virtual environment (once) and runs the test suite: the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh && setup_venv dev
export CUDA_VISIBLE_DEVICES="" TF_CPP_MIN_LOG_LEVEL=3
start=$(date +%s)
status=0
# --durations: the slowest wall times; conftest.py adds CPU seconds per file and per test,
# and orders the files longest first (--no-loadscope-reorder keeps that order).
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder --durations=15 "$@" || status=$?
elapsed=$(( $(date +%s) - start ))
printf 'test suite wall time: %d min %02d s\n' $((elapsed / 60)) $((elapsed % 60))
exit "$status"
