"""Exports a trained model to SavedModel and TFLite (every quantization mode), verified.

    python apps/export.py --model_path=runs/vit_tiny --export_dir=saved_models/vit_tiny \
        --modes=fp32,fp16,dynamic,int8 --dataset=shapes

--model_path is a .keras file, a training model_dir (its model.keras, else its last
checkpoint) or a registered name. int8 and int8_mixed are calibrated on the first
--calibration_batches x --batch_size images (256 by default) of the validation split of
--dataset: for a training run's model, by default the run's own validation data (dataset,
--val_samples, --seed, image size from its flags.txt), i.e. the same images, in the same
order, that the training app calibrated its int8 export on, so the two files and their
top-1 agreement are identical. Every mode is verified on up to --held_out images that
follow them (the calibration never sees them; without any, on the calibration images).
Each TFLite file is verified against Keras before it replaces an existing file; the table
gives its batch-1 latency under LiteRT and the app recommends the fastest file whose
agreement is >= 99%.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (fail, load_model, prepare_environment, read_preprocessing,  # noqa: E402
                    run_data_settings)

prepare_environment()

from absl import app, flags  # noqa: E402

F = flags.FLAGS
MODES = {"fp32": "none", "fp16": "float16", "dynamic": "dynamic",
         "dynamic_mixed": "dynamic_mixed", "int8": "int8", "int8_mixed": "int8_mixed"}
RECOMMEND_AGREEMENT = 0.99
flags.DEFINE_string("model_path", None, "A .keras file, a training model_dir or a registered "
                    "name.", required=True)
flags.DEFINE_string("export_dir", "saved_models/export", "Output directory.")
flags.DEFINE_list("modes", list(MODES), "TFLite modes: " + ",".join(MODES) + " (int8_mixed: "
                  "int8 matmuls and convolutions, LayerNorm/softmax/GELU float, layer groups "
                  "back in float until agreement >= 99%; dynamic_mixed: dynamic range, layer "
                  "groups back to float weights until agreement >= 99.5%).")
flags.DEFINE_bool("saved_model", True, "Also write a SavedModel.")
flags.DEFINE_string("dataset", None, "Calibration/verification data (needed for int8; "
                    "default: the training run's).")
flags.DEFINE_integer("val_samples", None, "Size of the shapes validation split the "
                     "calibration images are the first of (default: the training run's).")
flags.DEFINE_integer("calibration_batches", 8, "Batches of --dataset for int8 calibration.")
flags.DEFINE_integer("batch_size", 32, "Batch size of the calibration data.")
flags.DEFINE_integer("tflite_batch_size", 1, "Fixed batch size inside the TFLite files.")
flags.DEFINE_integer("held_out", 512, "Verify on up to this many validation images after the "
                     "calibration images.")
flags.DEFINE_integer("latency_calls", 50, "Timed batch-1 LiteRT calls per file (0: no latency).")
flags.DEFINE_integer("seed", None, "Seed of the shapes data (default: the training run's, "
                     "else 0).")


def validation_pipeline(model, dataset, img_size, seed, val_samples, prep):
    """(batched validation images with their labels or masks, DatasetInfo) for the task."""
    from keras_vit.registry import model_task

    if model_task(model) == "detection":
        from keras_vit.detection.data import load_detection_dataset, make_detection_pipeline

        ds, info = load_detection_dataset(dataset, "validation", img_size=img_size, seed=seed,
                                          num_samples=val_samples)
        return make_detection_pipeline(
            ds, training=False, img_size=img_size, batch_size=F.batch_size,
            **{k: prep[k] for k in ("mean", "std") if k in prep}), info
    if model_task(model) == "segmentation":
        from keras_vit.segmentation.data import (load_segmentation_dataset,
                                                 make_segmentation_pipeline)

        ds, info = load_segmentation_dataset(
            dataset, "validation", img_size=img_size, seed=seed, num_samples=val_samples,
            num_classes=model.output_shape[-1],
            reduce_zero_label=prep.get("reduce_zero_label", False))
        return make_segmentation_pipeline(
            ds, training=False, img_size=img_size, batch_size=F.batch_size,
            **{k: prep[k] for k in ("mean", "std") if k in prep}), info
    from keras_vit.data import load_dataset, make_pipeline

    ds, info = load_dataset(dataset, "validation", img_size=img_size, seed=seed,
                            num_samples=val_samples)
    return make_pipeline(ds, training=False, img_size=img_size, batch_size=F.batch_size,
                         num_classes=info.num_classes,
                         **{k: prep[k] for k in ("mean", "std", "crop_pct", "interpolation")
                            if k in prep}), info


def batch1_latency_ms(path, calls):
    """Median batch-1 latency of the file under LiteRT (its own threads), zeros as input."""
    import numpy as np

    from keras_vit.export.tflite import LiteRTRunner
    from keras_vit.measure import median, timed

    runner = LiteRTRunner(path)
    if int(runner.inputs[0]["shape"][0]) != 1:
        return None
    feed = {k: np.zeros(d["shape"], np.float32) for k, d in runner.named_inputs.items()}
    return 1000 * median(timed(lambda: runner(**feed), max(3, calls // 10), calls))


def recommend(rows, kind):
    """The fastest mode whose agreement (``kind``; fp32 counts as exact) is >= 99%."""
    ok = [(r["latency_ms"], mode) for mode, r in rows if r.get("latency_ms") is not None
          and (MODES[mode] == "none" or (r.get(kind) or 0) >= RECOMMEND_AGREEMENT)]
    return min(ok)[1] if ok else None


def main(argv):
    del argv
    bad = [m for m in F.modes if m not in MODES]
    if bad:
        fail(f"--modes: unknown {bad}; choose from {list(MODES)}")
    model = load_model(F.model_path)
    from keras_vit.registry import model_task

    if model_task(model) == "detection":  # the exported graph ends in the post-processing
        from keras_vit.detection.training import detection_inference_model, with_postprocessing

        from keras_vit.registry import get_model_config, list_models

        num_classes = read_preprocessing(F.model_path).get("num_classes") or (
            get_model_config(model.name)["num_classes"] if model.name in list_models() else None)
        model = with_postprocessing(detection_inference_model(model), num_classes)
    run = run_data_settings(F.model_path)
    dataset = F.dataset or run.get("dataset")
    bad = [m for m in F.modes if m not in MODES]
    if bad:
        fail(f"--modes: unknown {', '.join(bad)}; valid: {', '.join(MODES)}")
    if any(m.startswith("int8") for m in F.modes) and not dataset:
        fail("an int8 export needs calibration data: pass --dataset (e.g. --dataset=shapes)")
    import numpy as np

    from keras_vit.export import export_saved_model, export_tflite
    from keras_vit.export.tflite import calibration_split

    img_size = model.input_shape[1]
    data = held_out = None
    if dataset:
        prep = read_preprocessing(F.model_path)
        seed = F.seed if F.seed is not None else run.get("seed", 0)
        # the run's validation split, as it validated on it: its first images calibrate
        calibration = F.calibration_batches * F.batch_size
        val_samples = F.val_samples or (run.get("val_samples") if dataset == run.get("dataset")
                                        else calibration + F.held_out)
        try:
            pipe, info = validation_pipeline(model, dataset, img_size, seed, val_samples, prep)
        except ValueError as e:
            fail(f"--dataset {dataset!r}: {e}")
        batches = -(-(calibration + F.held_out) // F.batch_size)
        data, held_out = calibration_split(
            np.concatenate([np.asarray(x) for x, _ in pipe.take(batches)]), calibration)
        print(f"calibration: the first {len(data)} images of {dataset} (validation, seed "
              f"{seed}, {info.num_examples} images); verification: "
              + (f"the {len(held_out)} after them" if held_out is not None else
                 "the same images (no others)"))
    os.makedirs(F.export_dir, exist_ok=True)
    if F.saved_model:
        print(f"SavedModel: {export_saved_model(model, os.path.join(F.export_dir, 'saved_model'))}")
    from keras_vit.export import TFLiteExportError

    rows, refused = [], []
    for mode in F.modes:
        path = os.path.join(F.export_dir, "model.tflite" if mode == "fp32" else f"model_{mode}.tflite")
        try:
            r = export_tflite(model, path, quantization=MODES[mode], representative_data=data,
                              batch_size=F.tflite_batch_size, verification_data=held_out)
        except TFLiteExportError as e:  # the other modes still export; the exit status says it
            print(f"{mode}: not written: {e}")
            refused.append(f"{mode}: {e}")
            continue
        if F.latency_calls:
            r["latency_ms"] = batch1_latency_ms(path, F.latency_calls)
        rows.append((mode, r))
    kind = next((k for k in ("pixel_agreement", "detection_agreement")
                 if any(r.get(k) is not None for _, r in rows)), "top1_agreement")
    label = {"pixel_agreement": "per-pixel", "detection_agreement": "detection",
             "top1_agreement": "top-1"}[kind]
    print(f"\n| mode | file | size (MB) | batch-1 ms | max abs diff | rel. diff | {label} "
          "agreement |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows:
        agreement = r.get(kind)
        if kind == "detection_agreement":  # ranked outputs: tensor diffs mean nothing there
            r = dict(r, max_abs_diff=float("nan"), relative_diff=float("nan"))
        top1 = "-" if agreement is None else f"{100 * agreement:.1f}%"
        # ranked detections: tensor differences say nothing (a near-tie swaps two rows)
        diffs = ("-", "-") if kind == "detection_agreement" else (
            f"{r['max_abs_diff']:.2e}", f"{r['relative_diff']:.2e}")
        latency = f"{r['latency_ms']:.2f}" if "latency_ms" in r else "-"
        print(f"| {mode} | {r['path']} | {r['size_bytes'] / 1e6:.2f} | {latency} | {diffs[0]} | "
              f"{diffs[1]} | {top1} |")
        if r.get("mixed_precision"):
            print(f"  {mode}: float layer groups {r['mixed_precision']['float_groups'] or 'none'}"
                  f"; int8: {', '.join(r['mixed_precision']['int8_groups']) or 'none'}")
    recommended = recommend(rows, kind)
    if recommended:
        print(f"recommended: {recommended} (the fastest file with agreement >= "
              f"{100 * RECOMMEND_AGREEMENT:.0f}%)")
    with open(os.path.join(F.export_dir, "export_report.json"), "w") as f:
        json.dump(dict({m: r for m, r in rows}, recommended=recommended), f, indent=1)
    if refused:
        fail("TFLite files not written (the others are): " + " | ".join(refused))


if __name__ == "__main__":
    app.run(main)
