"""T2T-ViT against the official code (yitu-opensource/T2T-ViT): timm has no T2T-ViT.

Fixtures: tools/fixtures/t2t_vit.py (needs T2T_VIT_REPO, a checkout of the official repo).
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
from keras_vit.layers import sinusoid_table
from keras_vit.models.t2t_vit import SoftSplit, t2t_vit, token_grid

FIXTURES = load_fixture_index("t2t_vit")
with open(fixture_path("t2t_vit", "official_param_counts.json")) as _f:
    OFFICIAL_COUNTS = json.load(_f)
# Survey / official README (reference_numbers.md), in millions.
PAPER_COUNTS = {"t2t_vit_14": 21.5, "t2t_vit_19": 39.2, "t2t_vit_24": 64.1,
                "t2t_vit_t_14": 21.5, "t2t_vit_t_19": 39.2, "t2t_vit_t_24": 64.1,
                "t2t_vit_7": 4.3, "t2t_vit_10": 5.9}
TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, mlp_ratio=3.0, token_dim=8,
            num_classes=5)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_official_parity(name):
    check_timm_parity("t2t_vit", name, FIXTURES[name])


def test_sinusoid_table_is_the_official_formula():
    ref = np.load(fixture_path("t2t_vit", "official_sinusoid.npz"))
    np.testing.assert_allclose(sinusoid_table(50, 48), ref["table_50x48"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(sinusoid_table(197, 40), ref["table_197x40"], rtol=0, atol=1e-6)
    model = t2t_vit(**TINY)
    pos = np.asarray(model.get_layer("pos_embed").pos_embed)
    np.testing.assert_array_equal(pos[0], sinusoid_table(1 + 4, 32))
    assert not model.get_layer("pos_embed").trainable_weights  # fixed, as the official


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_full_size_parameter_count_equals_official(name):
    ref = OFFICIAL_COUNTS[name]
    model = create_model_without_weights(name)
    assert model.output_shape[-1] == ref["num_classes"]
    # The official count includes its requires_grad=False parameters (the position
    # embedding and the Performer's w); both are non-trainable weights here.
    assert model.count_params() == ref["params"]
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == ref["trainable"]
    if name in PAPER_COUNTS:
        assert abs(ref["params"] / 1e6 - PAPER_COUNTS[name]) <= 0.005 * PAPER_COUNTS[name]
    cfg = keras_vit.get_model_config(name)
    assert model.input_shape[1:3] == (cfg["input_size"],) * 2
    assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)


def test_every_official_variant_is_registered():
    assert keras_vit.list_models("t2t_vit*") == sorted(OFFICIAL_COUNTS)


def test_soft_split_is_torch_unfold_order():
    # torch's nn.Unfold(k=3, s=2, p=1) on a (1, C, 5, 5) map, channel-major features.
    c, k, s, p, n = 2, 3, 2, 1, 5
    x = np.arange(c * n * n, dtype=np.float32).reshape(1, c, n, n) + 1
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    o = (n + 2 * p - k) // s + 1
    ref = np.stack([xp[0, :, i * s:i * s + k, j * s:j * s + k].reshape(-1)
                    for i in range(o) for j in range(o)])
    out = np.asarray(SoftSplit(k, s, p)(np.transpose(x, (0, 2, 3, 1))))
    np.testing.assert_array_equal(out[0], ref)


def test_transformer_tokens_to_token(tmp_path):
    # The Performer variant is test_contract.py's t2t_vit case.
    check_variant(t2t_vit(**dict(TINY, tokens_type="transformer")), images(4, 32), tmp_path,
                  train=True)


@pytest.mark.parametrize("size", [48, (32, 64)])
def test_any_valid_size(size):
    model, (h, w) = check_builds_at(t2t_vit, TINY, size)
    assert token_grid(h, w) == (h // 16, w // 16)
    assert model.get_layer("pos_embed").pos_embed.shape[1] == 1 + (h // 16) * (w // 16)


def test_invalid_size_names_valid_neighbours():
    with pytest.raises(ValueError, match=r"soft-split stride \(4 \* 2 \* 2\) 16; "
                                         r"valid neighbours: 224 or 240"):
        keras_vit.create_model("t2t_vit_14", img_size=230)


def test_features_only_returns_token_maps():
    model = t2t_vit(**dict(TINY, img_size=64, depth=3, features_only=True, out_indices=(0, 2)))
    feats = model(images(2, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 4, 4, 32)] * 2
    with pytest.raises(ValueError, match="out index 5"):
        t2t_vit(**dict(TINY, features_only=True, out_indices=(5,)))


def test_features_only_loads_official_checkpoint_and_matches_the_full_model():
    check_last_block_map_is_its_patch_tokens("t2t_vit", "t2t_performer_64", t2t_vit, "blocks.1",
                                              (2, 4, 4, 48))


def test_create_model_pretrained_loads_official_state_dict():
    entry = FIXTURES["t2t_transformer_64"]
    data = np.load(fixture_path("t2t_vit", "t2t_transformer_64.npz"))
    kwargs = {k: v for k, v in entry["kwargs"].items() if k != "tokens_type"}
    model = keras_vit.create_model("t2t_vit_t_14", pretrained=fixture_path("t2t_vit",
                                                                            entry["weights"]),
                                   **kwargs)
    np.testing.assert_allclose(np.asarray(model(data["x"])), data["y0"], atol=1e-4)
