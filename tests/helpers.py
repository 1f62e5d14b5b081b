"""The DESIGN.md contract as reusable checks: every family's tests call these."""

import importlib
import os

import keras
import numpy as np

from conftest import fixture_path, images, load_fixture_index, load_param_counts
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.export import export_tflite
from keras_vit.models.common import count_parameters
from keras_vit.registry import create_model, get_model_config


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


def create_model_without_weights(name, **kwargs):
    """A registered model's layers and weight shapes, its weights never initialised.

    For parameter counts of full-size models: the random initialisation of a ViT-L's
    300 M weights alone costs ~15 s of CPU, the graph under a second. The variables stay
    uninitialised (the model cannot run); clearing the session drops them from Keras'
    list of deferred variables, so no later scope initialises them either.
    """
    with keras.StatelessScope(initialize_variables=False):
        model = create_model(name, **kwargs)
    keras.backend.clear_session()
    return model


def check_last_block_map_is_its_patch_tokens(family, name, builder, block, shape):
    """The features_only model of the last block (out_indices=1) loads the full checkpoint of
    fixture ``name``; its map is that block's patch tokens in the headless model ([CLS]
    dropped), row-major."""
    entry = load_fixture_index(family)[name]
    weights = load_checkpoint(fixture_path(family, entry["weights"]))
    full = builder(**dict(entry["kwargs"], num_classes=0))
    feats = builder(**dict(entry["kwargs"], features_only=True, out_indices=1))
    load_timm_weights(full, weights)
    load_timm_weights(feats, weights)
    x = np.load(fixture_path(family, f"{name}.npz"))["x"]
    fmap = np.asarray(feats(x))
    assert fmap.shape == shape
    tokens = np.asarray(keras.Model(full.input, full.get_layer(block).output)(x))
    batch, h, w, dim = shape
    np.testing.assert_allclose(fmap.reshape(batch, h * w, dim), tokens[:, 1:], atol=1e-6)


def check_param_count_equals_timm(family, name, **cfg):
    """The full-size variant has timm's default head, exactly timm's parameter count and its
    config's input size; ``cfg`` lists other config values it must have (crop_pct, mean...)."""
    ref = load_param_counts(family)[name]
    model = create_model_without_weights(name)
    if ref["num_classes"]:
        assert model.output_shape[-1] == ref["num_classes"]
    assert count_parameters(model) == ref["params"], (count_parameters(model), ref["params"])
    config = get_model_config(name)
    assert model.input_shape[1:3] == (config["input_size"],) * 2
    assert {k: config[k] for k in cfg} == cfg
    return model


def check_builds_at(builder, kwargs, size):
    """Built at ``size`` (int or (h, w)), the model maps one image to one row of logits;
    returns the model and (h, w) for the family's own checks of its resized tables."""
    h, w = (size, size) if isinstance(size, int) else size
    model = builder(**dict(kwargs, img_size=size))
    assert tuple(model(images(1, (h, w))).shape) == (1, kwargs["num_classes"])
    return model, (h, w)


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


def check_variant(model, x, tmp_path, train=False):
    """A config whose code path the family's smallest config (tests/test_contract.py) lacks:
    its logits, safe-mode round trip and TFLite; one training step when ``train``."""
    assert tuple(model(x).shape) == (len(x), model.output_shape[-1])
    check_keras_round_trip(model, x, tmp_path)
    report = check_tflite_fp32(model, tmp_path)
    if train:
        check_train_step_lowers_loss(model, x, np.arange(len(x)))
    return report


def check_train_step_lowers_loss(model, x, y, lr=1e-3, steps=1):
    """One AdamW step on a fixed batch lowers the cross-entropy loss.

    Eagerly: the same gradients and update as a compiled step, without tracing the
    training graph (~20 s of CPU for a small Swin; graph-mode fit is tests/test_training.py's).
    A model with BatchNorm first takes its moving statistics from the batch (momentum 0 for
    one pass), then keeps them fixed through the step (momentum 1), so the eval-mode loss
    before and after differs by the optimizer's step alone: the statistics' own update in
    the step moved it more than a small step does (MedT at lr 1e-4 rose by 1e-4 with 20
    settling passes, depending on what ran before).
    """
    norms = [layer for layer in model._flatten_layers()
             if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    try:
        for layer in norms:
            layer.momentum = 0.0
        if norms:
            model(x, training=True)
        for layer in norms:
            layer.momentum = 1.0
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=0.05), loss=loss_fn,
                      run_eagerly=True)
        before = float(model.evaluate(x, y, verbose=0, batch_size=len(x)))
        for _ in range(steps):
            model.train_on_batch(x, y)
        after = float(model.evaluate(x, y, verbose=0, batch_size=len(x)))
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
    assert after < before, (before, after)
    return before, after
