"""Prints the README's model table: every registered model's parameters and GMACs.

    .venv/bin/python tools/model_table.py [PATTERN ...] > /tmp/table.md

GMACs come from the Keras graph: TensorFlow's profiler counts the float
operations of the traced inference graph at batch 1 and the default size;
MatMul/Conv count 2 per multiply-accumulate, so GMACs = FLOPs / 2 (element-wise
ops add a little, as in fvcore-style counts they are usually left out).
Parameters are counted as torch does (BatchNorm running statistics excluded).

Families whose blocks all have the same shapes (ViT, DeiT, XCiT) are counted
per block: the same model built with depth 1 and depth 2 gives the cost of the
rest and of one block, and the cost is linear in depth, so the count is exact
(ViT-S/16 4627172994, ViT-L/32 15407463460, XCiT-T24 2358005858 MACs both
ways). This keeps the graphs small: tracing a 24-block XCiT takes minutes on a
loaded CPU. The depth comes from the parameter counts the same way.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras  # noqa: E402

import keras_vit  # noqa: E402
from keras_vit.models.common import count_macs, count_parameters  # noqa: E402

# Families with identical blocks whose builder takes ``depth``: MACs are linear in depth.
PER_BLOCK_FAMILIES = ("vit", "deit", "xcit")


def _built(name, **kwargs):
    model = keras_vit.create_model(name, **kwargs)
    counts = count_parameters(model), count_macs(model)
    del model
    keras.backend.clear_session()
    return counts


def count_macs_per_block(name, params):
    """MACs of ``name`` (``params`` parameters) from its depth-1 and depth-2 versions."""
    params_1, macs_1 = _built(name, depth=1)
    params_2, macs_2 = _built(name, depth=2)
    depth = 1 + (params - params_1) / (params_2 - params_1)
    if depth != int(depth):
        raise ValueError(f"{name}: blocks are not all the same size (depth {depth:.3f})")
    return macs_1 + (int(depth) - 1) * (macs_2 - macs_1)


def main():
    patterns = sys.argv[1:] or ["*"]
    print("| model | family | input | params (M) | GMACs |")
    print("|---|---|---|---|---|")
    for name in sorted({n for p in patterns for n in keras_vit.list_models(p)}):
        if name.startswith("transformer"):
            continue
        cfg = keras_vit.get_model_config(name)
        model = keras_vit.create_model(name)
        params = count_parameters(model)
        if cfg["family"] in PER_BLOCK_FAMILIES:
            del model
            keras.backend.clear_session()
            macs = count_macs_per_block(name, params)
        else:
            macs = count_macs(model)
            del model
            keras.backend.clear_session()
        print(f"| `{name}` | {cfg['family']} | {cfg['input_size']} | {params / 1e6:.2f} | "
              f"{macs / 1e9:.2f} |", flush=True)


if __name__ == "__main__":
    main()
