"""PVT v1 (official whai362/PVT) and PVT v2 (timm pvt_v2.py): the contract checks."""

import json

import numpy as np
import pytest

import keras_vit
from conftest import fixture_path, images, load_fixture_index, load_param_counts
from helpers import (
    build_from_fixture,
    check_builds_at,
    check_keras_round_trip,
    check_param_count_equals_timm,
    check_timm_parity,
    check_variant,
    create_model_without_weights,
)
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.convert.pvt import pvt_v2_official_to_timm
from keras_vit.models.pvt import pyramid_vision_transformer, pyramid_vision_transformer_v2

FIXTURES = load_fixture_index("pvt")
V1_TINY = dict(img_size=32, embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 2, 4),
               mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1), num_classes=5)
V2_TINY = dict(img_size=32, embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 2, 4),
               mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1), num_classes=5)
# PVT v1 Table 2 (reference_numbers.md), millions of parameters.
PAPER_PARAMS = {"pvt_tiny": 13.2, "pvt_small": 24.5, "pvt_medium": 44.2, "pvt_large": 61.4}


def official_counts():
    with open(fixture_path("pvt", "official_param_counts.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", sorted(n for n, e in FIXTURES.items() if "convert" not in e))
def test_reference_parity(name):
    check_timm_parity("pvt", name, FIXTURES[name])


@pytest.mark.parametrize("name", sorted(n for n, e in FIXTURES.items() if "convert" in e))
def test_v2_official_checkpoint_parity(name):
    entry = FIXTURES[name]
    sd = load_checkpoint(fixture_path("pvt", entry["weights"]))
    assert "block1.0.mlp.dwconv.dwconv.weight" in sd and "norm4.weight" in sd
    model = build_from_fixture(entry)
    load_timm_weights(model, pvt_v2_official_to_timm(sd))
    data = np.load(fixture_path("pvt", f"{name}.npz"))
    diff = float(np.max(np.abs(np.asarray(model(data["x"], training=False)) - data["y0"])))
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("name", sorted(load_param_counts("pvt")))
def test_v2_full_size_parameter_count_equals_timm(name):
    check_param_count_equals_timm("pvt", name, input_size=224)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_v1_full_size_parameter_count_equals_official(name):
    model = create_model_without_weights(name)
    ref = official_counts()[name]
    assert model.output_shape[-1] == ref["num_classes"]
    assert model.count_params() == ref["params"]
    assert abs(model.count_params() / 1e6 - PAPER_PARAMS[name]) <= 0.005 * PAPER_PARAMS[name]


def test_registered_variants():
    assert keras_vit.list_models("pvt*") == sorted(list(PAPER_PARAMS) + list(load_param_counts("pvt")))
    for name in keras_vit.list_models("pvt*"):
        cfg = keras_vit.get_model_config(name)
        assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"]) == (224, 0.9, "bicubic")
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)


def test_v2_linear_pooled_reduction(tmp_path):
    # v1 (strided-conv reduction, position embeddings, [CLS]) and v2 (overlapping
    # embeddings, depthwise-conv FFN) are test_contract.py's pvt and pvt_v2 cases;
    # v2-Li adds the pooled reduction.
    model = pyramid_vision_transformer_v2(**dict(V2_TINY, linear=True, img_size=(32, 64)))
    check_variant(model, images(4, (32, 64)), tmp_path, train=True)


@pytest.mark.parametrize("builder,tiny", [(pyramid_vision_transformer, V1_TINY),
                                          (pyramid_vision_transformer_v2, V2_TINY)],
                         ids=["v1", "v2"])
@pytest.mark.parametrize("size", [64, (32, 96)])
def test_any_valid_size(builder, tiny, size):
    check_builds_at(builder, tiny, size)


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_tiny"])
def test_invalid_size_names_valid_neighbours(name):
    with pytest.raises(ValueError, match=r"not a multiple of the network stride .* 32; "
                                         r"valid neighbours: 224 or 256"):
        keras_vit.create_model(name, img_size=230)


def test_invalid_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="class_token=False needs features_only=True"):
        pyramid_vision_transformer(**dict(V1_TINY, class_token=False))
    with pytest.raises(ValueError, match="sr_ratio must be 1"):
        pyramid_vision_transformer(**dict(V1_TINY, img_size=64, sr_ratios=(8, 4, 2, 2)))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        pyramid_vision_transformer_v2(**dict(V2_TINY, num_heads=(3, 2, 2, 4)))
    with pytest.raises(ValueError, match="one value per stage"):
        pyramid_vision_transformer_v2(**dict(V2_TINY, sr_ratios=(8, 4, 2)))


@pytest.mark.parametrize("builder,tiny", [(pyramid_vision_transformer, V1_TINY),
                                          (pyramid_vision_transformer_v2, V2_TINY)],
                         ids=["v1", "v2"])
def test_features_only_returns_stage_maps(builder, tiny, tmp_path):
    model = builder(**dict(tiny, img_size=64, features_only=True))
    feats = model(images(2, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 24),
                                               (2, 2, 2, 32)]
    two = builder(**dict(tiny, img_size=64, features_only=True, out_indices=(0, 2)))
    assert [tuple(f.shape) for f in two.outputs] == [(None, 16, 16, 8), (None, 4, 4, 24)]
    check_keras_round_trip(two, images(2, 64), tmp_path)
    with pytest.raises(ValueError, match="out index 4"):
        builder(**dict(tiny, features_only=True, out_indices=(4,)))


@pytest.mark.parametrize("name", ["pvt_v1_64_features", "pvt_v2_64_features"])
def test_features_only_loads_checkpoint_with_head_strictly(name):
    entry = FIXTURES[name]
    model = build_from_fixture(entry)
    load_timm_weights(model, load_checkpoint(fixture_path("pvt", entry["weights"])), strict=True)


def test_v1_checkpoint_names_are_official():
    sd = load_checkpoint(fixture_path("pvt", FIXTURES["pvt_v1_64"]["weights"]))
    for key in ("patch_embed1.proj.weight", "pos_embed1", "pos_embed4", "cls_token",
                "block1.0.attn.q.weight", "block1.0.attn.sr.weight", "block3.0.attn.norm.bias",
                "block2.1.mlp.fc2.bias", "norm.weight", "head.weight"):
        assert key in sd, key


def test_v1_pretrained_path_through_create_model_at_another_size():
    # pvt_v1_96_from_64: the official 64 px model run at 96 px (pos_embed interpolated
    # in its forward), reproduced by a 96 px Keras model that resizes on load.
    entry = FIXTURES["pvt_v1_96_from_64"]
    data = np.load(fixture_path("pvt", "pvt_v1_96_from_64.npz"))
    model = keras_vit.create_model("pvt_tiny", pretrained=fixture_path("pvt", entry["weights"]),
                                   **{k: v for k, v in entry["kwargs"].items()})
    np.testing.assert_allclose(np.asarray(model(data["x"])), data["y0"], atol=1e-4)
    assert model.get_layer("pos_embed1").pos_embed.shape == (1, 24 * 24, 16)
