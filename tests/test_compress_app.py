"""apps/compress.py on a small classifier: every method, each compressed model saved and
exported, and the table's numbers those of the saved files."""

import json
import os

import keras
import numpy as np

import app_process
import keras_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "apps", "compress.py")
DATA = ["--dataset=shapes", "--train_samples=64", "--val_samples=64", "--seed=3",
        "--batch_size=32"]


def run_app(*args):
    return app_process.run_app(APP, *args, cwd=ROOT, timeout=900)


def validation_accuracy(model):
    """The app's validation images (shapes, seed 3, 64 images at the model's size) read as
    apps/evaluate.py reads them."""
    from keras_vit.data import load_dataset, make_pipeline

    ds, info = load_dataset("shapes", "validation", img_size=32, seed=3, num_samples=64)
    pipe = make_pipeline(ds, training=False, img_size=32, batch_size=32,
                         num_classes=info.num_classes)
    right = total = 0
    for x, y in pipe:
        right += int(np.sum(np.argmax(model(x), -1) == np.asarray(y)))
        total += len(y)
    return right / total


def test_every_method_writes_the_model_its_row_measures(tmp_path):
    model = keras_vit.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8,
                                   embed_dim=32, depth=4, num_heads=4, num_classes=8)
    path = str(tmp_path / "small.keras")
    model.save(path)
    out = tmp_path / "compressed"
    # the methods with the app's own wiring (importance batches, gates' training, the
    # schedule's sample); low_rank and layer_drop are the library calls test_compress checks
    proc = run_app(f"--model_path={path}", f"--output_dir={out}", *DATA,
                   "--methods=heads,vtp,patch_slimming",
                   "--vtp_steps=2", "--head_rounds=2",
                   "--importance_batches=1", "--latency_iters=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "compress_report.json").read_text())
    assert [r["method"] for r in rows] == ["none", "heads", "vtp", "patch_slimming"]
    base = rows[0]
    assert base["before_accuracy"] == validation_accuracy(model)  # the model given, as given
    for row in rows[1:]:
        method = row["method"]
        small = keras.saving.load_model(str(out / method / "model.keras"))
        assert (out / method / "model.tflite").stat().st_size / 1e6 == row["tflite_mb"]
        assert row["accuracy"] == validation_accuracy(small), method
        assert row["finetuned_accuracy"] is None  # --finetune_steps=0 (the default)
        assert row["gmacs"] < base["gmacs"], method  # each removes work
        if method != "patch_slimming":  # which keeps every weight, computing fewer tokens
            assert keras_vit.models.common.count_parameters(small) == row["params"] < \
                base["params"], method
    assert rows[1]["details"]["heads"] == "8 of 16"
    assert "| patch_slimming |" in proc.stdout and "| heads |" in proc.stdout


def test_bad_flags_stop_before_any_work(tmp_path):
    proc = run_app(f"--model_path={tmp_path}/none.keras", "--methods=heads,magic")
    assert proc.returncode != 0
    assert "--methods: unknown ['magic']; choose from heads,vtp," in proc.stderr
    proc = run_app(f"--model_path={tmp_path}/none.keras", "--head_fraction=1.5")
    assert "--head_fraction must be in (0, 1), got 1.5" in proc.stderr
