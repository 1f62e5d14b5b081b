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
from keras_vit.models.tnt import transformer_in_transformer
from keras_vit.registry import INCEPTION_MEAN, INCEPTION_STD

FIXTURES = load_fixture_index("tnt")
TINY = dict(img_size=32, patch_size=16, embed_dim=16, inner_dim=8, depth=1, num_heads_inner=2,
            num_heads_outer=2, mlp_ratio=2, num_classes=5)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_timm_parity(name):
    check_timm_parity("tnt", name, FIXTURES[name])


@pytest.mark.parametrize("name", sorted(load_param_counts("tnt")))
def test_full_size_parameter_count_equals_timm(name):
    model = check_param_count_equals_timm("tnt", name, crop_pct=0.9, interpolation="bicubic",
                                          mean=INCEPTION_MEAN, std=INCEPTION_STD)
    # timm 1.0.31: tnt_s/b_patch16_224 are legacy=False; only *_legacy_* is the old layout.
    assert model.get_layer("blocks.0").legacy == ("legacy" in name)


def test_every_registered_tnt_has_a_timm_count():
    assert sorted(load_param_counts("tnt")) == keras_vit.list_models("tnt_*")


def test_legacy_layout_round_trip_and_tflite(tmp_path):
    # The current layout (legacy=False) is test_contract.py's tnt case.
    check_variant(transformer_in_transformer(**dict(TINY, legacy=True)), images(4, 32), tmp_path)


@pytest.mark.parametrize("size", [32, (48, 16), 64])
def test_any_valid_size(size):
    model, (h, w) = check_builds_at(transformer_in_transformer, TINY, size)
    assert model.get_layer("patch_pos").pos_embed.shape[1] == 1 + (h // 16) * (w // 16)


def test_invalid_size_names_valid_neighbours():
    with pytest.raises(ValueError, match=r"not a multiple of patch_size 16; valid neighbours: 224 or 240"):
        keras_vit.create_model("tnt_s_patch16_224", img_size=230)


def test_features_only_returns_patch_maps():
    model = transformer_in_transformer(**dict(TINY, depth=3, features_only=True,
                                              out_indices=(0, 2)))
    feats = model(images(2, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 2, 2, 16)] * 2
    default = transformer_in_transformer(**dict(TINY, depth=4, features_only=True))
    assert len(default.outputs) == 3  # timm's default: the last 3 blocks
    headless = transformer_in_transformer(**dict(TINY, num_classes=0))
    assert tuple(headless(images(2, 32)).shape) == (2, 16)
    with pytest.raises(ValueError, match="out index 5"):
        transformer_in_transformer(**dict(TINY, features_only=True, out_indices=(5,)))


def test_features_only_loads_checkpoint_with_head():
    entry = FIXTURES["tnt_32"]
    model = transformer_in_transformer(**dict(entry["kwargs"], features_only=True,
                                              out_indices=(1,)))
    load_timm_weights(model, load_checkpoint(fixture_path("tnt", entry["weights"])))
