import numpy as np
import pytest

import keras_vit
from conftest import fixture_path, images, load_fixture_index
from helpers import build_from_fixture, check_builds_at, create_model_without_weights
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.models.vit_conv_stem import conv_stem_strides, pycls_vit_to_timm, vit_conv_stem

# The official pycls ViT (conv stem) fixture lives with BoTNet's (tools/fixtures/botnet.py).
PYCLS = {k: v for k, v in load_fixture_index("botnet").items() if k.startswith("vit_c_pycls")}

TINY = dict(img_size=32, stem_chs=(8, 16, 16, 32), stem_strides=(2, 2, 1, 2), embed_dim=32,
            depth=2, num_heads=2, mlp_ratio=3.0, num_classes=5)

# Xiao et al. 2021, Table 1 (model definitions), "params (M)" of the ViT_C models. The paper
# prints one decimal: the count must round to it and lie within 0.5% of it where that
# precision allows (4.6M only pins the count to 4.55-4.65M).
PAPER_PARAMS_M = {"vit_c_1gf": 4.6, "vit_c_4gf": 17.8, "vit_c_18gf": 81.6, "vit_c_36gf": 167.8}


def trainable_params(model):
    # Parameters as torch counts them: BatchNorm's moving statistics are buffers.
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_count_matches_paper(name):
    model = create_model_without_weights(name)
    ours, paper = trainable_params(model), PAPER_PARAMS_M[name] * 1e6
    assert round(ours / 1e6, 1) == PAPER_PARAMS_M[name], ours
    assert abs(ours - paper) <= max(0.005 * paper, 0.05e6), ours
    assert model.input_shape[1:3] == (224, 224)
    assert model.get_layer("pos_embed").pos_embed.shape[1] == 1 + 14 * 14


@pytest.mark.parametrize("name", sorted(PYCLS))
def test_parity_with_official_pycls(name):
    entry = PYCLS[name]
    model = build_from_fixture(entry)
    official = load_checkpoint(fixture_path("botnet", entry["weights"]))
    assert "stem.cstem_last_conv.weight" in official  # pycls's own names
    load_timm_weights(model, pycls_vit_to_timm(official))
    data = np.load(fixture_path("botnet", f"{name}.npz"))
    diff = float(np.max(np.abs(np.asarray(model(data["x"], training=False)) - data["y0"])))
    assert diff <= 1e-4, diff


def test_registered_names_and_configs():
    assert keras_vit.list_models("vit_c_*") == sorted(PAPER_PARAMS_M)
    cfg = keras_vit.get_model_config("vit_c_4gf")
    assert cfg["input_size"] == 224 and cfg["family"] == "vit_conv_stem"


def test_paper_stem_strides():
    assert conv_stem_strides((24, 48, 96, 192)) == (2, 2, 2, 2)
    assert conv_stem_strides((64, 128, 128, 256, 256, 512)) == (2, 2, 1, 2, 1, 2)


@pytest.mark.parametrize("size", [48, (32, 64)])
def test_any_valid_size(size):
    model, (h, w) = check_builds_at(vit_conv_stem, TINY, size)
    assert model.get_layer("pos_embed").pos_embed.shape[1] == 1 + (h // 8) * (w // 8)


def test_invalid_size_names_valid_neighbours():
    with pytest.raises(ValueError, match=r"not a multiple of the conv stem's stride 16; "
                                         r"valid neighbours: 224 or 240"):
        keras_vit.create_model("vit_c_1gf", img_size=230)
    with pytest.raises(ValueError, match="stem_strides"):
        vit_conv_stem(**dict(TINY, stem_strides=(2, 2)))


def test_features_only_returns_token_maps():
    model = vit_conv_stem(**dict(TINY, features_only=True, out_indices=(0, 1)))
    feats = model(images(2, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 4, 4, 32)] * 2
    headless = vit_conv_stem(**dict(TINY, num_classes=0))
    assert tuple(headless(images(2, 32)).shape) == (2, 32)
    with pytest.raises(ValueError, match="out index 5"):
        vit_conv_stem(**dict(TINY, features_only=True, out_indices=(5,)))
