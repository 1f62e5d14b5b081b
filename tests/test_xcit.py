import numpy as np
import pytest

import keras_vit
from conftest import images, load_fixture_index, load_param_counts
from conftest import fixture_path as _fixture_path
from helpers import (
    build_from_fixture,
    check_builds_at,
    check_param_count_equals_timm,
    check_timm_parity,
    check_train_step_lowers_loss,
    check_variant,
)
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.models.xcit import fourier_features, xcit
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD

FIXTURES = load_fixture_index("xcit")
COUNTS = load_param_counts("xcit")
TINY = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=5)


def fixture_path(name):
    return _fixture_path("xcit", name)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_timm_parity(name):
    check_timm_parity("xcit", name, FIXTURES[name])


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_full_size_parameter_count_equals_timm(name):
    """timm's count (BatchNorm's moving statistics, timm's buffers, left out); weights
    never initialised: the 28 variants reach 189 M parameters."""
    check_param_count_equals_timm("xcit", name)


def test_every_registered_xcit_has_a_timm_count_and_cfg():
    assert sorted(COUNTS) == keras_vit.list_models("xcit*")
    for name in COUNTS:
        cfg = keras_vit.get_model_config(name)
        assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"]) == (
            int(name[-3:]), 1.0, "bicubic")
        assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (IMAGENET_MEAN, IMAGENET_STD)


def test_p8_embedding_tokens_norm_and_avg_pool(tmp_path):
    """Round trip and builtin-only TFLite of the other patch embedding and pooling mode
    (TINY's p16 and class-token pooling are test_contract.py's xcit case)."""
    model = xcit(**dict(TINY, img_size=(32, 48), patch_size=8, tokens_norm=True, eta=1e-5,
                        global_pool="avg"))
    check_variant(model, images(4, (32, 48)), tmp_path)


def test_train_step_lowers_loss():
    """One AdamW step (BatchNorm on batch statistics, stochastic depth on) lowers the loss.
    One small configuration (every layer type, few variables): tracing the optimizer's
    per-variable updates dominates the time."""
    model = xcit(**dict(TINY, depth=1, cls_attn_layers=1, drop_path_rate=0.1))
    check_train_step_lowers_loss(model, images(4, 32), np.array([0, 1, 2, 3]))


@pytest.mark.parametrize("size", [32, (48, 64), 80])
def test_any_valid_size(size):
    model, (h, w) = check_builds_at(xcit, TINY, size)
    assert model.get_layer("blocks.0").local_mp.grid_size == (h // 16, w // 16)


def test_invalid_size_names_valid_sizes():
    with pytest.raises(ValueError,
                       match=r"not a multiple of patch_size 16; valid neighbours: 224 or 240"):
        keras_vit.create_model("xcit_nano_12_p16_224", img_size=230)
    with pytest.raises(ValueError, match="patch_size 8 or 16"):
        xcit(**dict(TINY, patch_size=4))


def test_fourier_features_match_the_formula():
    """Spot values of timm's PositionalEncodingFourier grid (before the 1x1 projection)."""
    table = fourier_features((2, 3), hidden_dim=4)[0]
    assert table.shape == (2, 3, 8)
    y = 2 / (2 + 1e-6) * 2 * np.pi  # row 2 of 2; channels: sin(y/1), cos(y/1), sin(y/100), ...
    x = 1 / (3 + 1e-6) * 2 * np.pi  # column 1 of 3
    expected = [np.sin(y), np.cos(y), np.sin(y / 100), np.cos(y / 100),
                np.sin(x), np.cos(x), np.sin(x / 100), np.cos(x / 100)]
    np.testing.assert_allclose(table[1, 0], expected, atol=1e-6)


def test_features_only_returns_stride_16_token_maps():
    model = xcit(**dict(TINY, img_size=64, depth=3, features_only=True, out_indices=(0, 2)))
    assert [tuple(f.shape) for f in model(images(2, 64))] == [(2, 4, 4, 32)] * 2
    with pytest.raises(ValueError, match="out index 5"):
        xcit(**dict(TINY, features_only=True, out_indices=(5,)))


def test_features_only_loads_a_full_checkpoint():
    """Every backbone weight loads strictly; the class-attention part and the head are the
    cut-off tail of a features_only model."""
    entry = FIXTURES["xcit_p16_64_features"]
    model = build_from_fixture(entry)
    missing, unexpected = load_timm_weights(
        model, load_checkpoint(fixture_path(entry["weights"])), strict=True)
    assert missing == [] and unexpected == []
