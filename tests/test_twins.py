import pytest

import keras_vit
from conftest import images, load_fixture_index, load_param_counts
from helpers import (
    check_builds_at,
    check_param_count_equals_timm,
    check_timm_parity,
    check_variant,
)
from keras_vit.models.twins import twins
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD

FIXTURES = load_fixture_index("twins")
TINY = dict(patch_size=4, embed_dims=(8, 16, 16, 24), num_heads=(1, 2, 2, 3),
            mlp_ratios=(2, 2, 2, 2), depths=(2, 1, 2, 1), sr_ratios=(8, 4, 2, 1), num_classes=5)
TINY_SVT = dict(TINY, wss=(3, 3, 3, 3))


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_timm_parity(name):
    check_timm_parity("twins", name, FIXTURES[name])


@pytest.mark.parametrize("name", sorted(load_param_counts("twins")))
def test_full_size_parameter_count_equals_timm(name):
    check_param_count_equals_timm("twins", name, input_size=224, crop_pct=0.9,
                                  interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def test_every_registered_twins_has_a_timm_count():
    assert sorted(load_param_counts("twins")) == keras_vit.list_models("twins*")


def test_pcpvt_round_trip_and_tflite(tmp_path):
    # SVT (every layer PCPVT has, plus LSA; trained there) is test_contract.py's twins case.
    check_variant(twins(img_size=64, **TINY), images(4, 64), tmp_path)


@pytest.mark.parametrize("size", [32, (64, 96), 128])
def test_any_valid_size(size):
    check_builds_at(twins, TINY_SVT, size)  # windows of 3 on grids of 1 to 8


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
