import numpy as np
import pytest

import keras_vit
from conftest import images, load_fixture_index, load_param_counts
from helpers import (
    check_keras_round_trip,
    check_param_count_equals_timm,
    check_tflite_fp32,
    check_timm_parity,
    check_train_step_lowers_loss,
)
from keras_vit.models.twins import twins

FIXTURES = load_fixture_index("twins")
TINY = dict(patch_size=4, embed_dims=(8, 16, 16, 24), num_heads=(1, 2, 2, 3),
            mlp_ratios=(2, 2, 2, 2), depths=(2, 1, 2, 1), sr_ratios=(8, 4, 2, 1), num_classes=5)
TINY_SVT = dict(TINY, wss=(3, 3, 3, 3))


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_timm_parity(name):
    check_timm_parity("twins", name, FIXTURES[name])


@pytest.mark.parametrize("name", sorted(load_param_counts("twins")))
def test_full_size_parameter_count_equals_timm(name):
    model = check_param_count_equals_timm("twins", name)
    cfg = keras_vit.get_model_config(name)
    assert model.input_shape[1:3] == (224, 224)
    assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"]) == (224, 0.9, "bicubic")
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)


def test_every_registered_twins_has_a_timm_count():
    assert sorted(load_param_counts("twins")) == keras_vit.list_models("twins*")


@pytest.mark.parametrize("kwargs,train", [(TINY, False), (TINY_SVT, True)], ids=["pcpvt", "svt"])
def test_contract_on_tiny_config(kwargs, train, tmp_path):
    # 64 px: every SVT stage grid (16, 8, 4, 2) is padded to a multiple of the window 3.
    model = twins(img_size=64, **kwargs)
    x = images(4, 64)
    assert tuple(model(x).shape) == (4, 5)
    check_keras_round_trip(model, x, tmp_path)
    check_tflite_fp32(model, tmp_path)
    if train:  # SVT has every layer PCPVT has (GSA, PEG, patch embeds) plus LSA: train it once
        check_train_step_lowers_loss(model, x, np.array([0, 1, 2, 3]))


@pytest.mark.parametrize("size", [32, (64, 96), 128])
def test_any_valid_size(size):
    model = twins(img_size=size, **TINY_SVT)
    h, w = (size, size) if isinstance(size, int) else size
    assert tuple(model(images(1, (h, w))).shape) == (1, 5)


def test_invalid_size_names_valid_neighbours():
    with pytest.raises(ValueError, match=r"not a multiple of the network stride .*32; "
                                         r"valid neighbours: 224 or 256"):
        keras_vit.create_model("twins_svt_small", img_size=230)


def test_grid_smaller_than_sr_ratio_is_a_clear_error():
    with pytest.raises(ValueError, match="sr_ratio 16"):
        twins(img_size=32, **dict(TINY, sr_ratios=(16, 4, 2, 1)))


def test_features_only_returns_stage_maps():
    model = twins(img_size=64, features_only=True, **TINY_SVT)
    feats = model(images(2, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 16),
                                               (2, 2, 2, 24)]
    model = twins(img_size=64, features_only=True, out_indices=(1, 2), **TINY)
    assert [tuple(f.shape) for f in model(images(1, 64))] == [(1, 8, 8, 16), (1, 4, 4, 16)]
    assert not any(l.name.startswith(("blocks.3", "norm", "head")) for l in model.layers)


def test_headless_model_returns_pooled_features():
    model = twins(img_size=64, **dict(TINY, num_classes=0))
    assert tuple(model(images(2, 64)).shape) == (2, 24)
