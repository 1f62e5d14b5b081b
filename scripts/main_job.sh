#!/usr/bin/env bash
# The README's main job: set up (once), train a small ViT on the embedded shapes dataset on
# the CPU, export SavedModel + an int8 TFLite file to saved_models/, verify it, summarise.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh && setup_venv
exec .venv/bin/python apps/train.py --flagfile=configs/main_job.flags "$@"
