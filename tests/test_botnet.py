import numpy as np
import pytest

import keras_vit
from conftest import fixture_path, images, load_fixture_index, load_param_counts
from helpers import (
    check_builds_at,
    check_keras_round_trip,
    check_timm_parity,
    create_model_without_weights,
)
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.models.botnet import botnet

# The index also holds ViT_C's pycls fixture (tests/test_vit_conv_stem.py).
FIXTURES = {k: v for k, v in load_fixture_index("botnet").items() if k.startswith("botnet")}
TINY = dict(FIXTURES["botnet_tiny_64"]["kwargs"], num_classes=5)
TINY_S1_SE = dict(FIXTURES["botnet_s1_tiny_64"]["kwargs"], num_classes=5, se_ratio=0.0625)


def trainable_params(model):
    # timm counts parameters only; Keras' count_params adds BatchNorm's moving statistics.
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_timm_parity(name):
    check_timm_parity("botnet", name, FIXTURES[name])


@pytest.mark.parametrize("name", sorted(load_param_counts("botnet")))
def test_timm_variant_parameter_count_equals_timm(name):
    ref = load_param_counts("botnet")
    assert sorted(ref) == ["botnet26t_256", "botnet50ts_256"]
    model = create_model_without_weights(name)
    assert trainable_params(model) == ref[name]["params"]  # 12,488,672 and 22,742,688
    assert model.output_shape[-1] == ref[name]["num_classes"]
    cfg = keras_vit.get_model_config(name)
    assert model.input_shape[1:3] == (cfg["input_size"],) * 2 == (256, 256)
    assert cfg["crop_pct"] == 0.95 and cfg["interpolation"] == "bicubic"


# Paper (Srinivas et al. 2021): BoTNet-S1-59 33.5M parameters (Table "BoTNet-S1" / T3;
# reference_numbers.md); BoT50 and BoT-S1-50 20.8M. The counts here include every
# BatchNorm and relative-position weight (the authors' counting script leaves them out).
@pytest.mark.parametrize("name, paper_m", [("botnet_s1_50", 20.8), ("botnet_s1_59", 33.5)])
def test_s1_parameter_count_matches_paper(name, paper_m):
    model = create_model_without_weights(name)
    ours = trainable_params(model)
    assert abs(ours / (paper_m * 1e6) - 1) <= 0.005, ours
    assert model.input_shape[1:3] == (224, 224)
    # S1: the last stage keeps stride 16, so its attention runs on 14x14 maps.
    attn = model.get_layer("stages.3.0.self_attn")
    assert attn.feat_size == (14, 14) and attn.stride == 1


# TINY (botnet26t's layout) is test_contract.py's botnet case, trained there too.
def test_round_trip_s1_se_config(tmp_path):
    model = botnet(**TINY_S1_SE)
    assert model.get_layer("stages.3.1.attn_last.fc1").kernel.shape == (1, 1, 128, 8)
    check_keras_round_trip(model, images(2, 64), tmp_path)


@pytest.mark.parametrize("size", [96, (64, 96)])
def test_any_valid_size(size):
    model, (h, w) = check_builds_at(botnet, TINY, size)
    # As timm: the relative tables are made for the feature map of this size.
    pos = model.get_layer("stages.3.1.self_attn").pos_embed
    assert tuple(pos.height_rel.shape) == (2 * (h // 32) - 1, 8)
    assert tuple(pos.width_rel.shape) == (2 * (w // 32) - 1, 8)


def test_invalid_size_names_valid_neighbours():
    with pytest.raises(ValueError, match=r"not a multiple of the network stride 32; "
                                         r"valid neighbours: 224 or 256"):
        keras_vit.create_model("botnet26t_256", img_size=250)
    with pytest.raises(ValueError, match=r"network stride 16; valid neighbours: 224 or 240"):
        keras_vit.create_model("botnet_s1_59", img_size=230)


def test_checkpoint_for_another_size_does_not_load():
    # timm's fixed_input_size: a 64 px checkpoint's relative tables do not fit 96 px.
    model = botnet(**dict(TINY, img_size=96, num_classes=10))
    sd = load_checkpoint(fixture_path("botnet", FIXTURES["botnet_tiny_64"]["weights"]))
    with pytest.raises(ValueError, match=r"stages.3.1.self_attn.pos_embed.height_rel"):
        load_timm_weights(model, sd)


def test_features_only_returns_stage_maps():
    model = botnet(**dict(TINY, features_only=True, out_indices=(0, 2, 3)))
    feats = model(images(2, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 32), (2, 4, 4, 96), (2, 2, 2, 128)]
    s1 = botnet(**dict(TINY_S1_SE, features_only=True))
    assert [tuple(f.shape[1:3]) for f in s1(images(1, 64))] == [(16, 16), (8, 8), (4, 4), (4, 4)]
    with pytest.raises(ValueError, match="out index 4"):
        botnet(**dict(TINY, features_only=True, out_indices=(4,)))
