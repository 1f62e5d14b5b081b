"""The segmentation journey through the apps: train on two replicas, resume on one (defaults:
poly schedule), evaluate (mIoU equal to the training summary's), export with per-pixel
agreement, and a bad mask folder refused before any step."""

import os

import numpy as np
from PIL import Image

from test_training import read, run_app

# A narrow SegFormer-B0 (the README's model; every other family's training step and export
# are in tests/test_contract.py): all four MiT stages and the all-MLP decoder, 64 px shapes.
TINY = ["--model=segformer_b0",
        '--model_args={"embed_dims": [8, 16, 24, 32], "num_heads": [1, 2, 2, 4], '
        '"mlp_ratios": [2, 2, 2, 2], "depths": [1, 1, 1, 1], "decoder_dim": 16}',
        "--img_size=64", "--train_samples=48", "--val_samples=16", "--batch_size=16"]


def test_train_resume_evaluate_export(tmp_path):
    run = str(tmp_path / "run")
    # The first epoch on two CPU replicas (mirrored: per-replica loss, global mIoU)...
    first = run_app("train.py", *TINY, "--epochs=1", "--strategy=mirrored", "--cpu_replicas=2",
                    f"--model_dir={run}")
    assert "validation mIoU" in first.stdout
    summary = read(os.path.join(run, "summary.json"))
    assert summary["steps"] == 3 and np.isfinite(summary["val_miou"])
    # ... then rerun with more epochs and the default strategy: resumes from the mirrored
    # run's checkpoint after its 3 steps, ends at 6.
    run_app("train.py", *TINY, "--epochs=2", f"--model_dir={run}",
            f"--export_dir={run}/export", "--export_tflite=fp32")
    summary = read(os.path.join(run, "summary.json"))
    assert summary["task"] == "segmentation" and summary["steps"] == 6
    assert summary["num_classes"] == 9 and len(summary["val_per_class_iou"]) == 9
    assert 0 <= summary["val_miou"] <= 1 and 0 <= summary["val_pixel_accuracy"] <= 1
    # 6 steps teach little (pixel accuracy 4-37% over seeds): the loss going down is the sign
    history = read(os.path.join(run, "history.json"))
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]
    history = read(os.path.join(run, "history.json"))
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["learning_rate"] == 0.0  # poly decay reaches 0 at the last step
    tflite = summary["tflite"]
    assert tflite["pixel_agreement"] >= 0.99 and tflite["relative_diff"] <= 1e-4
    assert os.path.exists(os.path.join(run, "export", "model.tflite"))

    proc = run_app("evaluate.py", f"--model_path={run}", "--val_samples=16",
                   f"--output_dir={tmp_path}/eval")
    metrics = read(os.path.join(tmp_path, "eval", "metrics.json"))
    assert abs(metrics["mIoU"] - summary["val_miou"]) < 1e-6, (metrics["mIoU"], summary)
    assert metrics["count"] == 16 and "mIoU" in proc.stdout
    assert os.path.getsize(os.path.join(tmp_path, "eval", "segmentation_samples.png")) > 1000

    # The quantized modes (fp32 is the training export's above), calibrated and verified on
    # the run's own validation masks' images.
    proc = run_app("export.py", f"--model_path={run}", f"--export_dir={tmp_path}/export",
                   "--modes=dynamic,dynamic_mixed,int8", "--batch_size=8",
                   "--calibration_batches=2")
    assert "per-pixel agreement" in proc.stdout
    report = read(os.path.join(tmp_path, "export", "export_report.json"))
    assert report["dynamic"]["pixel_agreement"] >= 0.9 and report["int8"]["pixel_agreement"] >= 0.9
    # dynamic_mixed's search scores segmentation logits by their per-pixel argmax
    search = report["dynamic_mixed"]["mixed_precision"]["search"]
    assert search[0]["agreement"] is not None and report["dynamic_mixed"]["pixel_agreement"] >= 0.9


def test_a_bad_mask_is_named_before_any_step(tmp_path):
    root = tmp_path / "data"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(
                root / "images" / split / f"{i}.png")
            Image.fromarray(np.zeros((64, 48), np.uint8)).save(  # 48 px wide: wrong size
                root / "annotations" / split / f"{i}.png")
    run = tmp_path / "run"
    proc = run_app("train.py", *TINY, f"--dataset=folder:{root}", "--strict_data",
                   f"--model_dir={run}", check=False)
    assert proc.returncode != 0
    assert "0.png: mask is 48x64, its image 64x64" in proc.stderr
    assert not (run / "checkpoints").exists()
