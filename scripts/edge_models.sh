#!/usr/bin/env bash
# The trained models behind benchmarks/README.md's edge-precision agreement figures, kept out
# of git (runs/, saved_models/): a DeiT-S-size and a Swin-T-size model trained on the shapes
# data (configs/edge_*.flags), then each exported in every TFLite mode with its agreement on
# held-out images (apps/export.py) and evaluated under mixed_bfloat16 (apps/evaluate.py).
# Usage: bash scripts/edge_models.sh [deit_s] [swin_t]   (default: both; ~30 min each on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh && setup_venv
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(deit_s swin_t)
for one in "${models[@]}"; do
  .venv/bin/python apps/train.py --flagfile="configs/edge_${one}.flags"
  # exits non-zero when a mode's file fails its agreement check; the others are written
  .venv/bin/python apps/export.py --model_path="runs/edge_${one}" \
      --export_dir="saved_models/edge_${one}" || echo "edge_${one}: a mode was refused (above)"
  .venv/bin/python apps/evaluate.py --model_path="runs/edge_${one}" --precision=bfloat16
done
