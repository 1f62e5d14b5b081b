"""Compresses a trained classifier with the survey's efficient-transformer techniques, each
measured on the same validation images as the model it came from.

    python apps/compress.py --model_path=runs/main_job --methods=heads,low_rank,layer_drop \
        --finetune_steps=250

--model_path is a .keras file or a training model_dir. Data (dataset, sample counts, seed,
image size, preprocessing) default to the training run's own, so "before" is the accuracy
the training summary printed. Each method writes OUTPUT_DIR/<method>/model.keras and a
verified builtin-only fp32 model.tflite, and the app prints one table: validation accuracy
before / after compression / after fine-tuning, parameters, GMACs, Keras and TFLite
batch-1 latency and file size, each against the uncompressed model in the same run.

Methods: heads (Michel et al.: iterative head pruning by gate-gradient importance), vtp
(Zhu et al.: L1-sparse dimension gates, trained --vtp_steps, then pruned), patch_slimming
(Tang et al.: patches kept per block, chosen top-down on training images), low_rank (SVD
of the blocks' Dense layers at --low_rank_params of their weights), layer_drop (the
--keep_blocks evenly spread blocks; for a model trained with layer_drop), linear (the
dense attention swapped for linear attention with the same weights: the survey's O(N)
mixer, which needs fine-tuning).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (fail, load_model, model_dir_of, prepare_environment,  # noqa: E402
                    read_preprocessing, read_run_flags, run_data_settings)

prepare_environment()

from absl import app, flags  # noqa: E402

F = flags.FLAGS
METHODS = ("heads", "vtp", "patch_slimming", "low_rank", "layer_drop", "linear")
flags.DEFINE_string("model_path", None, "A .keras file or a training model_dir.", required=True)
flags.DEFINE_list("methods", list(METHODS), f"Any of {','.join(METHODS)}.")
flags.DEFINE_string("output_dir", None, "Where each method's model goes (default: "
                    "MODEL_DIR/compress).")
flags.DEFINE_string("dataset", None, "Data (default: the training run's).")
flags.DEFINE_integer("train_samples", None, "shapes: training images (default: the run's).")
flags.DEFINE_integer("val_samples", None, "shapes: validation images (default: the run's).")
flags.DEFINE_integer("seed", None, "Data seed (default: the run's, else 0).")
flags.DEFINE_integer("batch_size", 64, "Batch size of fine-tuning and evaluation.")
flags.DEFINE_integer("finetune_steps", 0, "Fine-tuning steps after each compression (0: none).")
flags.DEFINE_float("finetune_learning_rate", 1e-4, "AdamW learning rate of fine-tuning "
                   "(constant).")
flags.DEFINE_integer("importance_batches", 4, "Training batches that measure head / patch "
                     "importance.")
flags.DEFINE_float("head_fraction", 0.5, "heads: fraction of all heads removed.")
flags.DEFINE_integer("head_rounds", 5, "heads: pruning rounds (importance measured again "
                     "on the pruned model before each).")
flags.DEFINE_float("low_rank_params", 0.5, "low_rank: fraction of the blocks' Dense weights "
                   "kept.")
flags.DEFINE_integer("keep_blocks", None, "layer_drop: blocks kept (default: half).")
flags.DEFINE_float("vtp_fraction", 0.5, "vtp: fraction of the gated dimensions removed.")
flags.DEFINE_float("vtp_l1", 1e-4, "vtp: L1 weight on the gates during sparsity training.")
flags.DEFINE_integer("vtp_steps", 200, "vtp: sparsity-training steps before pruning.")
flags.DEFINE_float("slimming_tolerance", 0.05, "patch_slimming: relative error of the final "
                   "features allowed when choosing the patches kept per block.")
flags.DEFINE_integer("latency_iters", 50, "Timed batch-1 calls per latency (median).")


class Data:
    """The run's training stream and validation batches, loaded once."""

    def __init__(self, model_path, img_size):
        from keras_vit.data import load_dataset, make_pipeline

        run, flags_of_run = run_data_settings(model_path), read_run_flags(model_path)
        self.dataset = F.dataset or run.get("dataset")
        if not self.dataset:
            fail("--model_path is not a training run's: pass --dataset")
        self.seed = F.seed if F.seed is not None else run.get("seed", 0)
        val_samples = F.val_samples or run.get("val_samples")
        train_samples = F.train_samples or (int(flags_of_run["train_samples"]) if
                                            flags_of_run.get("train_samples") not in
                                            (None, "", "None") else None)
        prep = read_preprocessing(model_path)
        self.prep = {k: prep[k] for k in ("mean", "std", "crop_pct", "interpolation")
                     if k in prep}
        try:
            val, info = load_dataset(self.dataset, "validation", img_size=img_size,
                                     seed=self.seed, num_samples=val_samples)
            train, _ = load_dataset(self.dataset, "train", img_size=img_size, seed=self.seed,
                                    num_samples=train_samples)
        except ValueError as e:
            fail(f"--dataset {self.dataset!r}: {e}")
        self.num_classes, self.num_val = info.num_classes, info.num_examples
        self.val = make_pipeline(val, training=False, img_size=img_size,
                                 batch_size=F.batch_size, num_classes=info.num_classes,
                                 **self.prep).cache()
        self.train = make_pipeline(train, training=True, img_size=img_size,
                                   batch_size=F.batch_size, num_classes=info.num_classes,
                                   seed=self.seed, repeat=True, **self.prep)

    def batches(self, count):
        import numpy as np

        return [(np.asarray(x), np.asarray(y)) for x, y in self.train.take(count)]


def accuracy(model, data):
    import numpy as np

    correct = total = 0
    for x, y in data.val:
        pred = np.argmax(np.asarray(model(x, training=False)), axis=-1)
        correct += int(np.sum(pred == np.asarray(y).reshape(-1)))
        total += len(pred)
    return correct / total


def fine_tune(model, data, steps):
    """``steps`` AdamW steps (constant learning rate, weight decay 0.05, none on VTP's
    gates, whose only penalty is their L1) on the training stream; returns the model."""
    import keras

    import warnings

    if steps <= 0:
        return model
    # fit's default shuffle=True means nothing for a dataset (it is shuffled): no warning
    warnings.filterwarnings("ignore", message=".*shuffle=True. was passed")
    from keras_vit.training.optimizers import AdamW

    optimizer = AdamW(F.finetune_learning_rate, weight_decay=0.05)
    optimizer.exclude_from_weight_decay(var_names=["gates"])
    # a tf.function step: on these short runs XLA's compile (~10 s) costs more than it saves
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    model.fit(data.train, steps_per_epoch=steps, epochs=1, verbose=0)
    return model


# -- methods: each (model, data) -> (compressed model, details) ---------------------------

def compress_heads(model, data):
    from keras_vit.compress import count_heads, prune_heads_iteratively

    before = sum(count_heads(model).values())
    pruned = prune_heads_iteratively(model, data.batches(F.importance_batches),
                                     F.head_fraction, steps=F.head_rounds)
    heads = count_heads(pruned)
    return pruned, {"heads": f"{sum(heads.values())} of {before}",
                    "per_block": list(heads.values())}


def compress_low_rank(model, data):
    import numpy as np

    from keras_vit.compress import factorize_dense

    from keras_vit.compress import energy_for_fraction

    energy = energy_for_fraction(model, F.low_rank_params)
    small, ranks = factorize_dense(model, energy=energy)

    def block_kernels(m):  # the blocks' Dense weights (kernel or its two factors)
        return sum(int(np.prod(w.shape)) for w in m.weights
                   if w.path.startswith("blocks.") and "kernel" in w.path)

    kept = block_kernels(small) / block_kernels(model)
    return small, {"Dense weights kept": f"{100 * kept:.0f}%",
                   "SVD energy": f"{energy:.3f}", "ranks": ranks}


def compress_layer_drop(model, data):
    from keras_vit.compress import every_other_block, keep_blocks
    from keras_vit.compress.layers import block_layers

    depth = len(block_layers(model))
    keep = every_other_block(depth, F.keep_blocks or max(1, depth // 2))
    trained_with = any(layer.name.startswith("layer_drop.") for layer in model.layers)
    note = "" if trained_with else " (not trained with layer_drop: expect a large drop)"
    return keep_blocks(model, keep), {"blocks": f"{keep} of {depth}{note}"}


def compress_vtp(model, data):
    from keras_vit.compress import add_dimension_gates, prune_dimensions

    gated = add_dimension_gates(model, l1=F.vtp_l1)
    fine_tune(gated, data, F.vtp_steps)  # the sparsity training: CE + l1 * sum |gates|
    pruned, dims = prune_dimensions(gated, fraction=F.vtp_fraction)
    return pruned, {"head_dim": [d["head_dim"] for d in dims.values()],
                    "mlp_hidden_dim": [d["mlp_hidden_dim"] for d in dims.values()],
                    "sparsity_steps": F.vtp_steps}


def compress_patch_slimming(model, data):
    import numpy as np

    from keras_vit.compress import patch_slimming_schedule, slim_patches

    images = np.concatenate([x for x, _ in data.batches(F.importance_batches)])
    keep = patch_slimming_schedule(model, images, tolerance=F.slimming_tolerance)
    return slim_patches(model, keep), {"patches_per_block": list(keep)}


def compress_linear(model, data):
    from keras_vit.compress import with_attention

    return with_attention(model, "linear"), {"attention": "linear (the dense weights)"}


COMPRESS = {"linear": compress_linear, "heads": compress_heads, "vtp": compress_vtp,
            "patch_slimming": compress_patch_slimming, "low_rank": compress_low_rank,
            "layer_drop": compress_layer_drop}


# -- measurement -------------------------------------------------------------------------

def measure(model, path_dir, data, representative):
    """Parameters, GMACs, Keras and TFLite batch-1 latency (ms, medians), TFLite size; the
    fp32 file is written (atomically, verified against Keras) to ``path_dir``."""
    import tensorflow as tf

    from keras_vit.export import export_tflite
    from keras_vit.export.tflite import LiteRTRunner
    from keras_vit.measure import median, timed
    from keras_vit.models.common import count_macs, count_parameters

    import absl.logging

    x1 = representative[:1]
    fn = tf.function(lambda x: model(x, training=False))
    keras_ms = 1000 * median(timed(lambda: fn(x1), warmup=3, iters=F.latency_iters))
    report = export_tflite(model, os.path.join(path_dir, "model.tflite"), "none",
                           representative_data=representative, batch_size=1)
    runner = LiteRTRunner(report["path"])
    tflite_ms = 1000 * median(timed(lambda: runner(x1), warmup=3, iters=F.latency_iters))
    verbosity = absl.logging.get_verbosity()
    absl.logging.set_verbosity(absl.logging.ERROR)  # the profiler's TF1 deprecation notes
    macs = count_macs(model)
    absl.logging.set_verbosity(verbosity)
    return {"params": count_parameters(model), "gmacs": macs / 1e9,
            "keras_ms": keras_ms, "tflite_ms": tflite_ms,
            "tflite_mb": report["size_bytes"] / 1e6,
            "tflite_top1_agreement": report.get("top1_agreement")}


def save_model(model, path):
    from keras_vit.export.atomic import atomic_path

    with atomic_path(path) as tmp:
        model.save(tmp + ".keras")
        os.replace(tmp + ".keras", tmp)


def table(rows):
    lines = ["| method | val. acc. before | after | after fine-tune | params (M) | GMACs | "
             "Keras b1 (ms) | TFLite b1 (ms) | TFLite (MB) | details |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tuned = "-" if r.get("finetuned_accuracy") is None else \
            f"{100 * r['finetuned_accuracy']:.1f}%"
        lines.append(
            f"| {r['method']} | {100 * r['before_accuracy']:.1f}% | "
            f"{100 * r['accuracy']:.1f}% | {tuned} | {r['params'] / 1e6:.3f} | "
            f"{r['gmacs']:.4f} | {r['keras_ms']:.2f} | {r['tflite_ms']:.2f} | "
            f"{r['tflite_mb']:.2f} | {r['summary']} |")
    return "\n".join(lines)


def main(argv):
    del argv
    bad = [m for m in F.methods if m not in METHODS]
    if bad or not F.methods:
        fail(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    for name, value, low, high in (("head_fraction", F.head_fraction, 0, 1),
                                   ("low_rank_params", F.low_rank_params, 0, 1),
                                   ("vtp_fraction", F.vtp_fraction, 0, 1)):
        if not low < value < high:
            fail(f"--{name} must be in ({low}, {high}), got {value}")
    if F.finetune_steps < 0 or F.head_rounds < 1 or F.vtp_steps < 0:
        fail("--finetune_steps and --vtp_steps must be >= 0, --head_rounds >= 1")
    if not os.path.exists(F.model_path):
        fail(f"--model_path {F.model_path!r} does not exist")
    model = load_model(F.model_path)
    if len(model.outputs) != 1 or len(model.output_shape) != 2:
        fail(f"--model_path: {model.name} is not a classifier (one (batch, classes) output)")
    output_dir = F.output_dir or os.path.join(model_dir_of(F.model_path), "compress")
    data = Data(F.model_path, model.input_shape[1])
    import numpy as np

    representative = np.concatenate([np.asarray(x) for x, _ in data.val.take(2)])
    print(f"{model.name}: validation on {data.num_val} images of {data.dataset} "
          f"(seed {data.seed}); fine-tuning {F.finetune_steps} steps")
    rows = []
    start = time.perf_counter()
    base = {"method": "none", "before_accuracy": accuracy(model, data), "summary": "dense"}
    base["accuracy"] = base["before_accuracy"]
    base.update(measure(model, os.path.join(output_dir, "none"), data, representative))
    # the control: the dense model fine-tuned as long, so a gain is not mistaken for the
    # method's (a trained model often gains from more steps too)
    base["finetuned_accuracy"] = (accuracy(fine_tune(load_model(F.model_path), data,
                                                     F.finetune_steps), data)
                                  if F.finetune_steps else None)
    rows.append(base)
    print(table(rows))
    for method in F.methods:
        t = time.perf_counter()
        original = load_model(F.model_path)  # each method starts from the trained weights
        try:
            small, details = COMPRESS[method](original, data)
        except ValueError as e:
            fail(f"--methods={method}: {e}")
        row = {"method": method, "before_accuracy": base["accuracy"], "details": details}
        row["accuracy"] = accuracy(small, data)
        row["finetuned_accuracy"] = (accuracy(fine_tune(small, data, F.finetune_steps), data)
                                     if F.finetune_steps else None)
        directory = os.path.join(output_dir, method)
        save_model(small, os.path.join(directory, "model.keras"))
        row.update(measure(small, directory, data, representative))
        row["summary"] = ", ".join(f"{k} {v}" for k, v in details.items()
                                   if not isinstance(v, dict))
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        print(f"{method}: {row['seconds']:.0f} s")
    for r in rows[1:]:
        r["params_ratio"] = r["params"] / base["params"]
        r["tflite_speedup"] = base["tflite_ms"] / r["tflite_ms"]
        r["keras_speedup"] = base["keras_ms"] / r["keras_ms"]
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "compress_report.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
    print(table(rows))
    print(f"\n{len(F.methods)} methods in {time.perf_counter() - start:.0f} s; models and "
          f"compress_report.json in {output_dir}")


if __name__ == "__main__":
    app.run(main)
