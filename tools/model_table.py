"""Prints the README's model table: every registered model's parameters and GMACs.

    .venv/bin/python tools/model_table.py [PATTERN] > /tmp/table.md

GMACs come from the Keras graph: TensorFlow's profiler counts the float
operations of the frozen inference graph at batch 1 and the default size;
MatMul/Conv count 2 per multiply-accumulate, so GMACs = FLOPs / 2 (element-wise
ops add a little, as in fvcore-style counts they are usually left out).
Parameters are counted as torch does (BatchNorm running statistics excluded).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras  # noqa: E402

import keras_vit  # noqa: E402
from keras_vit.models.common import count_macs, count_parameters  # noqa: E402


def main():
    patterns = sys.argv[1:] or ["*"]
    print("| model | family | input | params (M) | GMACs |")
    print("|---|---|---|---|---|")
    for name in sorted({n for p in patterns for n in keras_vit.list_models(p)}):
        if name.startswith("transformer"):
            continue
        cfg = keras_vit.get_model_config(name)
        model = keras_vit.create_model(name)
        try:
            macs = f"{count_macs(model) / 1e9:.2f}"
        except ValueError:  # a frozen graph over protobuf's 2 GB limit (ViT-H)
            macs = "n/a (graph > 2 GB)"
        print(f"| `{name}` | {cfg['family']} | {cfg['input_size']} | "
              f"{count_parameters(model) / 1e6:.2f} | {macs} |", flush=True)
        del model
        keras.backend.clear_session()


if __name__ == "__main__":
    main()
