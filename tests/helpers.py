"""The DESIGN.md contract as reusable checks: every family's tests call these."""

import importlib
import os

import keras
import numpy as np

from conftest import fixture_path, load_param_counts
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.export import export_tflite
from keras_vit.models.common import count_parameters
from keras_vit.registry import create_model


def build_from_fixture(entry):
    module, fn = entry["builder"].rsplit(".", 1)
    return getattr(importlib.import_module(module), fn)(**entry["kwargs"])


def check_timm_parity(family, name, entry, atol=1e-4):
    """A fixture's timm outputs, reproduced through load_timm_weights (max abs diff <= atol)."""
    model = build_from_fixture(entry)
    weights = fixture_path(family, entry["weights"])
    load_timm_weights(model, load_checkpoint(weights), **entry.get("load", {}))
    data = np.load(fixture_path(family, f"{name}.npz"))
    outputs = model(data["x"], training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    assert len(outputs) == len([k for k in data.files if k.startswith("y")])
    for i, out in enumerate(outputs):
        diff = float(np.max(np.abs(np.asarray(out) - data[f"y{i}"])))
        assert diff <= atol, f"{name} output {i}: max abs diff {diff:.2e}"
    return model


def check_param_count_equals_timm(family, name):
    """The full-size variant has timm's default head and exactly timm's parameter count."""
    ref = load_param_counts(family)[name]
    model = create_model(name)
    if ref["num_classes"]:
        assert model.output_shape[-1] == ref["num_classes"]
    assert count_parameters(model) == ref["params"], (count_parameters(model), ref["params"])
    return model


def check_keras_round_trip(model, x, tmp_path):
    """Saved and reloaded in safe mode, the model gives the same output."""
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    a, b = model(x, training=False), loaded(x, training=False)
    for u, v in zip(keras.tree.flatten(a), keras.tree.flatten(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    return loaded


def check_tflite_fp32(model, tmp_path, batch_size=1):
    """Builtin-only fp32 TFLite whose output matches Keras within 1e-4 of the output scale."""
    report = export_tflite(model, os.path.join(tmp_path, "model.tflite"), batch_size=batch_size)
    assert report["relative_diff"] <= 1e-4, report
    return report


def check_train_step_lowers_loss(model, x, y, lr=1e-3, steps=1):
    """One AdamW step on a fixed batch lowers the cross-entropy loss."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=0.05), loss=loss_fn)
    before = float(model.evaluate(x, y, verbose=0, batch_size=len(x)))
    for _ in range(steps):
        model.train_on_batch(x, y)
    after = float(model.evaluate(x, y, verbose=0, batch_size=len(x)))
    assert after < before, (before, after)
    return before, after
