"""The detection journey through the apps: train a small YOLOS on the shapes boxes with the
defaults (set criterion, in-graph matching), evaluate (COCO AP equal to the training
summary's), export with the post-processing inside (verified TFLite), and bad input."""

import os

from test_training import read, run_app

TINY = ["--model=yolos_ti",
        '--model_args={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, '
        '"num_queries": 6, "init_pe_size": [48, 48]}',
        "--img_size=48", "--train_samples=48", "--val_samples=16", "--batch_size=16"]


def test_train_evaluate_export(tmp_path):
    run = str(tmp_path / "run")
    proc = run_app("train.py", *TINY, "--epochs=2", f"--model_dir={run}",
                   f"--export_dir={run}/export", "--export_tflite=fp32")
    assert "validation AP" in proc.stdout
    summary = read(os.path.join(run, "summary.json"))
    assert summary["task"] == "detection" and summary["steps"] == 6
    assert 0 <= summary["val_AP"] <= 1 and 0 <= summary["val_AP50"] <= 1
    tflite = summary["tflite"]  # scores, classes, pixel boxes of the top queries
    assert set(tflite["outputs"]) == {"boxes", "classes", "scores"}
    assert tflite["relative_diff"] <= 1e-4 and tflite["detection_agreement"] == 1.0
    assert tflite["outputs"]["boxes"]["shape"][1:] == [6, 4]  # the top 6 queries

    run_app("evaluate.py", f"--model_path={run}", f"--output_dir={tmp_path}/eval")
    metrics = read(os.path.join(tmp_path, "eval", "metrics.json"))
    assert abs(metrics["AP"] - summary["val_AP"]) < 1e-9 and metrics["count"] == 16
    assert os.path.getsize(os.path.join(tmp_path, "eval", "detection_samples.png")) > 1000

    # Quantized files are judged on confident detections (score >= 0.3), which six steps of
    # training do not give: the int8 file is refused (not written, exit status 2), the fp32
    # one written. tests/test_export.py and the README's shapes run check quantized files.
    proc = run_app("export.py", f"--model_path={run}", f"--export_dir={tmp_path}/export",
                   "--modes=fp32,int8", "--batch_size=8", "--calibration_batches=1", check=False)
    assert proc.returncode == 2 and "int8: not written" in proc.stdout, proc.stdout[-2000:]
    assert "no Keras detection to compare with" in proc.stderr
    report = read(os.path.join(tmp_path, "export", "export_report.json"))
    assert set(report) == {"fp32", "recommended"} and report["recommended"] == "fp32"
    assert not os.path.exists(os.path.join(tmp_path, "export", "model_int8.tflite"))
    assert report["fp32"]["max_abs_diff"] < 1e-3 * 48  # boxes within 1e-3 of the image size
    assert report["fp32"]["detection_agreement"] == 1.0


def test_coco_path_that_does_not_exist_is_named_before_any_step(tmp_path):
    proc = run_app("train.py", *TINY, "--dataset=coco:/no/such/instances_train.json",
                   f"--model_dir={tmp_path}/run", check=False)
    assert proc.returncode != 0 and "/no/such/instances_train.json" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_gradient_clipping_defaults_to_the_references():
    """Detection clips the gradients' global norm at 0.1 as DETR and Deformable DETR do;
    --clip_norm overrides it (0: off), other tasks do not clip unless asked, and a negative
    value is refused before any work."""
    import pytest

    from keras_vit.training.trainer import TrainConfig, gradient_clip_norm, validate

    assert gradient_clip_norm(TrainConfig(), "detection") == 0.1
    assert gradient_clip_norm(TrainConfig(), "classification") == 0.0
    assert gradient_clip_norm(TrainConfig(), "segmentation") == 0.0
    assert gradient_clip_norm(TrainConfig(clip_norm=0.0), "detection") == 0.0
    assert gradient_clip_norm(TrainConfig(clip_norm=1.0), "classification") == 1.0
    with pytest.raises(ValueError, match="--clip_norm must be >= 0"):
        validate(TrainConfig(clip_norm=-1.0))
