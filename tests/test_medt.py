"""Medical Transformer: parity with the official code (jeya-maria-jose/Medical-Transformer),
its parameter counts, checkpoint naming and what is special to MedT (the relative tables
sized by the input, the local branch's patches). The DESIGN.md contract runs on the
family's smallest config (``gated_axial_unet``) in tests/test_contract.py; MedT's own graph
(patches, tiling) is round-tripped and exported here."""

import json

import keras
import numpy as np
import pytest
from safetensors.numpy import save_file

import keras_vit
from conftest import fixture_path, images, load_fixture_index
from helpers import (build_from_fixture, check_keras_round_trip, check_tflite_fp32,
                     check_timm_parity, create_model_without_weights)
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.models.common import count_parameters
from keras_vit.segmentation.medt import (GridPatches, TilePatches, gated_axial_unet, medt,
                                         relative_index)

FIXTURES = load_fixture_index("medt")
TRAIN = "medt_tiny_128_train"  # training mode: per-patch BatchNorm statistics
TINY = dict(width_scale=0.03125, groups=2, depths=(1, 2, 1, 1), num_classes=3)


def _state_dict(name):
    return dict(load_checkpoint(fixture_path("medt", FIXTURES[name]["weights"])))


def _max_diff(model, name, training=False):
    data = np.load(fixture_path("medt", f"{name}.npz"))
    x = data["x"].astype(keras.config.floatx())
    return float(np.max(np.abs(np.asarray(model(x, training=training)) - data["y0"])))


@pytest.mark.parametrize("name", sorted(set(FIXTURES) - {TRAIN}))
def test_official_parity(name):
    # gated_axial_unet_tiny_32 / _64: two models, each built for its size (the relative
    # tables are); medt_tiny_128: the official loop's 32 px patches tile the image.
    model = check_timm_parity("medt", name, FIXTURES[name])
    assert model.output_shape[1:3] == model.input_shape[1:3]  # logits at the input size


def test_per_patch_training_mode_as_the_official_loop():
    """The official loop calls the local branch once per patch, so in training each patch's
    BatchNorms normalise with that patch's batch statistics: per_patch=True reproduces the
    official training-mode forward; the default one-batch local branch does not (it pools the
    statistics of the 16 patches) but agrees in inference. In float64 (the fixture's): the
    batch statistics of this tiny config amplify float32 rounding to ~1e-3 (in torch too)."""
    entry = FIXTURES[TRAIN]
    assert entry["training"] and entry["kwargs"]["per_patch"] and entry["dtype"] == "float64"
    keras.config.set_floatx("float64")
    try:
        model = build_from_fixture(entry)
        load_timm_weights(model, _state_dict(TRAIN))
        # The bilinear upsampling computes in float32 whatever the input's dtype.
        assert _max_diff(model, TRAIN, training=True) <= 1e-6
        batched = medt(**dict(entry["kwargs"], per_patch=False))
        load_timm_weights(batched, _state_dict(TRAIN))
        assert _max_diff(batched, "medt_tiny_128") <= 1e-6  # the same weights, inference
        assert _max_diff(batched, TRAIN, training=True) > 1e-2  # (updates its statistics)
    finally:
        keras.config.set_floatx("float32")


def test_parameter_counts_equal_the_official_code():
    with open(fixture_path("medt", "official_param_counts.json")) as f:
        official = json.load(f)
    for name in ("gated_axial_unet", "medt"):
        ref = official[name]
        model = create_model_without_weights(name)
        # Every official parameter: the gates and the modules it defines but never calls too.
        assert count_parameters(model) == ref["params"], (name, count_parameters(model))
        assert model.input_shape[1:] == (ref["img_size"], ref["img_size"], 3)
        assert model.output_shape[1:] == (ref["img_size"], ref["img_size"], ref["num_classes"])
        config = keras_vit.get_model_config(name)
        assert (config["task"], config["input_size"], config["num_classes"]) == (
            "segmentation", 128, 2)
        assert config["mean"] == (0.0, 0.0, 0.0) and config["std"] == (1.0, 1.0, 1.0)
    assert official["medt"]["params"] == 1560140
    assert official["gated_axial_unet"]["params"] == 1326914


def test_official_checkpoint_loads_through_create_model(tmp_path):
    """An official .pth state dict as train.py saves it (with the flatten_index buffers; with
    DataParallel's ``module.`` prefix too) loads strictly by name."""
    name = "gated_axial_unet_tiny_32"
    state = _state_dict(name)
    assert any(k.endswith("hight_block.flatten_index") for k in state)
    path = str(tmp_path / "module.safetensors")
    save_file({f"module.{k}": np.asarray(v) for k, v in state.items()}, path)
    model = keras_vit.create_model("gated_axial_unet", pretrained=path,
                                   **FIXTURES[name]["kwargs"])
    assert _max_diff(model, name) <= 1e-4
    state.pop("layer2.1.width_block.f_sve")
    with pytest.raises(ValueError, match="missing keys:\n  layer2.1.width_block.f_sve"):
        load_timm_weights(build_from_fixture(FIXTURES[name]), state)


def test_other_num_classes_keeps_the_pretrained_body(tmp_path):
    """create_model(num_classes=K, pretrained=PATH) with another K than the checkpoint's: new
    ``adjust`` / ``adjust_p`` classifiers, every other weight (the gates too) loaded."""
    name = "medt_tiny_128"
    kwargs = dict(FIXTURES[name]["kwargs"], num_classes=5)
    path = fixture_path("medt", FIXTURES[name]["weights"])
    model = keras_vit.create_model("medt", pretrained=path, **kwargs)
    assert model.output_shape[-1] == 5
    state = _state_dict(name)
    np.testing.assert_array_equal(
        np.asarray(model.get_layer("layer2.1.width_block").gates["f_sve"]),
        state["layer2.1.width_block.f_sve"])
    np.testing.assert_array_equal(np.asarray(model.get_layer("decoderf").kernel),
                                  np.transpose(state["decoderf.weight"], (2, 3, 1, 0)))
    assert np.asarray(model.get_layer("adjust_p").kernel).shape == (1, 1, 4, 5)


def test_checkpoint_of_another_size_is_refused():
    """The relative tables are sized by the input, as the official code's (no resampling)."""
    model = gated_axial_unet(**dict(TINY, img_size=64))
    with pytest.raises(ValueError, match="tied to the input size"):
        load_timm_weights(model, _state_dict("gated_axial_unet_tiny_32"))


def test_relative_index_is_the_official_flatten_index():
    state = _state_dict("gated_axial_unet_tiny_32")
    for kernel, key in ((16, "layer1.0.hight_block"), (8, "layer2.1.width_block"),
                        (4, "layer4.0.width_block")):
        np.testing.assert_array_equal(relative_index(kernel), state[f"{key}.flatten_index"])


def test_invalid_sizes_name_valid_neighbours():
    with pytest.raises(ValueError, match="valid neighbours: 32 or 64"):
        gated_axial_unet(**dict(TINY, img_size=48))
    with pytest.raises(ValueError, match="valid neighbours: 128 or 256"):
        medt(**dict(TINY, img_size=(128, 160)))
    with pytest.raises(ValueError, match="multiples of 2 \\* groups"):
        gated_axial_unet(img_size=32, width_scale=0.0625, groups=8)


def test_patches_tile_back_in_both_layouts():
    x = images(2, (8, 12), chans=2)
    for stacked in (True, False):
        patches = GridPatches(4, stacked=stacked)(x)
        if stacked:
            # Patch k = (row k // 4, column k % 4) is batch rows 2k, 2k + 1.
            np.testing.assert_array_equal(np.asarray(patches)[2 * 6:2 * 7], x[:, 2:4, 6:9])
        np.testing.assert_array_equal(np.asarray(TilePatches(4, stacked=stacked)(patches)), x)


def test_medt_non_square_round_trip_and_tflite(tmp_path):
    """MedT's own graph (16 patch slices, the local branch on one batch, the tiling) at a
    non-square size (a table per axis, 64 x 32 patches): safe-mode round trip, builtin TFLite."""
    model = medt(**dict(TINY, depths=(1, 1, 1, 1), img_size=(256, 128)))
    x = images(1, (256, 128))
    assert tuple(model(x).shape) == (1, 256, 128, 3)
    check_keras_round_trip(model, x, tmp_path)
    check_tflite_fp32(model, tmp_path)
