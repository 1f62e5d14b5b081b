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
    pattern = sys.argv[1] if len(sys.argv) > 1 else "*"
    print("| model | family | input | params (M) | GMACs |")
    print("|---|---|---|---|---|")
    for name in keras_vit.list_models(pattern):
        if name.startswith("transformer"):
            continue
        cfg = keras_vit.get_model_config(name)
        model = keras_vit.create_model(name)
        print(f"| `{name}` | {cfg['family']} | {cfg['input_size']} | "
              f"{count_parameters(model) / 1e6:.2f} | {count_macs(model) / 1e9:.2f} |", flush=True)
        del model
        keras.backend.clear_session()


if __name__ == "__main__":
    main()
