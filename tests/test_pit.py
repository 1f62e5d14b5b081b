import numpy as np
import pytest

import keras_vit
from conftest import fixture_path, images, load_fixture_index, load_param_counts
from helpers import (
    check_builds_at,
    check_param_count_equals_timm,
    check_timm_parity,
    check_variant,
)
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.models.pit import pooling_vision_transformer
from keras_vit.models.vit import distilled_inference_model
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD

FIXTURES = load_fixture_index("pit")
TINY = dict(img_size=32, patch_size=8, stride=4, base_dims=(8, 8, 8), depth=(1, 1, 1),
            heads=(2, 4, 8), mlp_ratio=2, num_classes=5)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_timm_parity(name):
    check_timm_parity("pit", name, FIXTURES[name])


@pytest.mark.parametrize("name", sorted(load_param_counts("pit")))
def test_full_size_parameter_count_equals_timm(name):
    check_param_count_equals_timm("pit", name, crop_pct=0.9, interpolation="bicubic",
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD)


def test_every_registered_pit_has_a_timm_count():
    assert sorted(load_param_counts("pit")) == keras_vit.list_models("pit_*")
    assert len(keras_vit.list_models("pit_*distilled*")) == 4


def test_distilled_round_trip_tflite_and_training(tmp_path):
    # The plain model is test_contract.py's pit case; this adds the second token and head.
    model = pooling_vision_transformer(**dict(TINY, distilled=True))
    check_variant(model, images(4, 32), tmp_path, train=True)


@pytest.mark.parametrize("size", [32, (40, 24), 48])
def test_any_valid_size(size):
    model, (h, w) = check_builds_at(pooling_vision_transformer, TINY, size)
    grid = ((h - 8) // 4 + 1, (w - 8) // 4 + 1)
    assert tuple(model.get_layer("pos_embed").pos_embed.shape) == (1,) + grid + (16,)


def test_invalid_size_names_valid_neighbours():
    with pytest.raises(ValueError, match=r"valid neighbours: 224 or 232"):
        keras_vit.create_model("pit_s_224", img_size=230)
    with pytest.raises(ValueError, match=r"stride 7.*valid neighbours: 252 or 259"):
        keras_vit.create_model("pit_b_224", img_size=256)
    with pytest.raises(ValueError, match=r"valid neighbours: 16 or 24"):
        keras_vit.create_model("pit_ti_224", img_size=12)


def test_checkpoint_loads_into_another_size():
    """A 32 px checkpoint loads into a 48 px model (pos_embed resized) with timm's output."""
    entry = FIXTURES["pit_48_from_32"]
    assert entry["weights"] == "pit_32.safetensors"
    model = check_timm_parity("pit", "pit_48_from_32", entry)
    assert tuple(model.get_layer("pos_embed").pos_embed.shape) == (1, 11, 11, 16)


def test_distilled_training_returns_both_heads_and_inference_averages():
    train_model = pooling_vision_transformer(**dict(TINY, distilled=True,
                                                    distilled_training=True))
    x = images(2, 32)
    cls_logits, dist_logits = (np.asarray(o) for o in train_model(x))
    infer = distilled_inference_model(train_model)
    np.testing.assert_allclose(np.asarray(infer(x)), (cls_logits + dist_logits) / 2, atol=1e-6)


def test_features_only_returns_stage_maps():
    model = pooling_vision_transformer(**dict(TINY, img_size=64, patch_size=16, stride=8,
                                              features_only=True))
    feats = model(images(2, 64))
    # strides 8, 16, 32 as timm's feature_info (7 -> 4 -> 2 maps: ceil halving)
    assert [tuple(f.shape) for f in feats] == [(2, 7, 7, 16), (2, 4, 4, 32), (2, 2, 2, 64)]
    headless = pooling_vision_transformer(**dict(TINY, num_classes=0))
    assert tuple(headless(images(2, 32)).shape) == (2, 64)
    with pytest.raises(ValueError, match="out index 3"):
        pooling_vision_transformer(**dict(TINY, features_only=True, out_indices=(3,)))


def test_features_only_loads_checkpoint_with_head():
    entry = FIXTURES["pit_32"]
    model = pooling_vision_transformer(**dict(entry["kwargs"], features_only=True,
                                              out_indices=(0, 2)))
    load_timm_weights(model, load_checkpoint(fixture_path("pit", entry["weights"])))
