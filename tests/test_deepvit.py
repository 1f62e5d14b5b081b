"""DeepViT against the official code (zhoudaquan/dvit_repo): timm has no DeepViT.

Fixtures: tools/fixtures/deepvit.py (needs DEEPVIT_REPO, a checkout of the official repo).
"""

import json

import numpy as np
import pytest

import keras_vit
from conftest import fixture_path, images, load_fixture_index
from helpers import (
    check_builds_at,
    check_last_block_map_is_its_patch_tokens,
    check_timm_parity,
    check_variant,
    create_model_without_weights,
)
from keras_vit.models.deepvit import deep_vision_transformer

FIXTURES = load_fixture_index("deepvit")
with open(fixture_path("deepvit", "official_param_counts.json")) as _f:
    OFFICIAL_COUNTS = json.load(_f)
TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=3, mlp_ratio=3.0,
            qkv_bias=True, reatten_blocks=2, num_classes=5)


def count_like_torch(model):
    """torch's sum(p.numel() for p in parameters()): BatchNorm running statistics are
    buffers there, non-trainable weights here."""
    return sum(int(np.prod(w.shape)) for w in model.weights
               if w.name not in ("moving_mean", "moving_variance"))


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_official_parity(name):
    check_timm_parity("deepvit", name, FIXTURES[name])


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_full_size_parameter_count_equals_official(name):
    ref = OFFICIAL_COUNTS[name]
    model = create_model_without_weights(name)
    assert model.output_shape[-1] == ref["num_classes"]
    assert count_like_torch(model) == ref["params"], (count_like_torch(model), ref["params"])
    cfg = keras_vit.get_model_config(name)
    assert model.input_shape[1:3] == (cfg["input_size"],) * 2
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["crop_pct"] == (1.0 if cfg["input_size"] == 384 else 0.9)
    reatten = [layer.name for layer in model.layers
               if layer.name.startswith("blocks.") and layer.attn.apply_transform]
    depth = len([layer for layer in model.layers if layer.name.startswith("blocks.")])
    expected = {"deepvit_s": 5, "deepvit_l": 12, "deepvit_l_384": 12}.get(name, depth)
    assert reatten == [f"blocks.{i}" for i in range(depth - expected, depth)]


def test_every_official_variant_is_registered():
    assert keras_vit.list_models("deepvit*") == sorted(OFFICIAL_COUNTS)


def test_re_attention_in_every_block(tmp_path):
    # DeepViT-S's CNN embedding and transform_scale are test_contract.py's deepvit case.
    check_variant(deep_vision_transformer(**dict(TINY, reatten_blocks=None)), images(4, 32),
                  tmp_path, train=True)


def test_training_updates_the_head_batch_norm_statistics():
    model = deep_vision_transformer(**TINY)
    bn = model.get_layer("blocks.2").attn.var_norm
    before = np.asarray(bn.moving_mean).copy()
    model(images(2, 32), training=True)
    assert not np.allclose(before, np.asarray(bn.moving_mean))


@pytest.mark.parametrize("size", [48, (32, 64)])
def test_any_valid_size(size):
    model, (h, w) = check_builds_at(deep_vision_transformer, dict(TINY, use_cnn_embed=True), size)
    assert model.get_layer("pos_embed").pos_embed.shape[1] == 1 + (h // 8) * (w // 8)


def test_invalid_size_names_valid_neighbours():
    with pytest.raises(ValueError, match=r"not a multiple of patch_size 16; valid neighbours: "
                                         r"224 or 240"):
        keras_vit.create_model("deepvit_s", img_size=230)


def test_features_only_returns_token_maps():
    model = deep_vision_transformer(**dict(TINY, features_only=True, out_indices=(0, 2)))
    feats = model(images(2, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 4, 4, 24)] * 2
    with pytest.raises(ValueError, match="out index 4"):
        deep_vision_transformer(**dict(TINY, features_only=True, out_indices=(4,)))


def test_features_only_loads_official_checkpoint_and_matches_the_full_model():
    check_last_block_map_is_its_patch_tokens("deepvit", "deepvit_s_like_32",
                                              deep_vision_transformer, "blocks.2", (2, 4, 4, 32))


def test_create_model_pretrained_loads_official_state_dict():
    entry = FIXTURES["deepvit_patch_32"]
    data = np.load(fixture_path("deepvit", "deepvit_patch_32.npz"))
    model = keras_vit.create_model("deepvit_patch16_224_re_attn_16b",
                                   pretrained=fixture_path("deepvit", entry["weights"]),
                                   **entry["kwargs"])
    np.testing.assert_allclose(np.asarray(model(data["x"])), data["y0"], atol=1e-4)
