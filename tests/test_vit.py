import os

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
    check_variant,
)
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.models.vit import distilled_inference_model, vision_transformer

VIT_FIXTURES = load_fixture_index("vit")
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def fixture_path(name):
    return _fixture_path("vit", name)


@pytest.mark.parametrize("name", sorted(VIT_FIXTURES))
def test_timm_parity(name):
    check_timm_parity("vit", name, VIT_FIXTURES[name])


def test_pretrained_path_loads_npz_through_create_model():
    entry = VIT_FIXTURES["vit_jax_32"]
    data = np.load(fixture_path("vit_jax_32.npz"))
    model = keras_vit.create_model("vit_tiny_patch16_224", pretrained=fixture_path(entry["weights"]),
                                   **{k: v for k, v in entry["kwargs"].items()})
    np.testing.assert_allclose(np.asarray(model(data["x"])), data["y0"], atol=1e-4)


@pytest.mark.parametrize("name", sorted(load_param_counts("vit")))
def test_full_size_parameter_count_equals_timm(name):
    check_param_count_equals_timm("vit", name)


def test_every_registered_vit_has_a_timm_count():
    ours = [n for n in keras_vit.list_models()
            if keras_vit.get_model_config(n)["family"] in ("vit", "deit")]
    assert sorted(load_param_counts("vit")) == ours


# The plain and the distilled model are test_contract.py's vit and deit cases.
@pytest.mark.parametrize("kwargs", [
    dict(TINY, class_token=False, global_pool="avg"),
    dict(TINY, representation_size=16, norm_first=False, init_values=1e-5),
])
def test_variant_configs(kwargs, tmp_path):
    check_variant(vision_transformer(**kwargs), images(4, 32), tmp_path, train=True)


@pytest.mark.parametrize("size", [32, (48, 24), 64])
def test_any_valid_size(size):
    model, (h, w) = check_builds_at(vision_transformer, TINY, size)
    assert model.get_layer("pos_embed").pos_embed.shape[1] == 1 + (h // 8) * (w // 8)


def test_invalid_size_names_valid_neighbours():
    with pytest.raises(ValueError, match=r"not a multiple of patch_size 16; valid neighbours: 224 or 240"):
        keras_vit.create_model("vit_small_patch16_224", img_size=230)


def test_wrong_channels_is_a_clear_error():
    model = vision_transformer(**TINY)
    with pytest.raises(ValueError, match="shape"):
        model(images(1, 32, chans=1))
    model4 = vision_transformer(**dict(TINY, in_chans=4))
    assert tuple(model4(images(1, 32, chans=4)).shape) == (1, 5)


def test_unknown_name_lists_closest():
    with pytest.raises(ValueError, match="closest: vit_small_patch16_224"):
        keras_vit.create_model("vit_smal_patch16_224")


def test_list_models_pattern_sorted():
    names = keras_vit.list_models("deit_*distilled*")
    assert names == sorted(names) and len(names) == 4


def test_distilled_training_returns_both_heads_and_inference_averages():
    train_model = vision_transformer(**dict(TINY, distilled=True, distilled_training=True))
    x = images(2, 32)
    cls_logits, dist_logits = (np.asarray(o) for o in train_model(x))
    infer = distilled_inference_model(train_model)
    np.testing.assert_allclose(np.asarray(infer(x)), (cls_logits + dist_logits) / 2, atol=1e-6)


def test_features_only_returns_token_maps():
    model = vision_transformer(**dict(TINY, depth=4, features_only=True, out_indices=(1, 3)))
    feats = model(images(2, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 4, 4, 32)] * 2
    full = vision_transformer(**dict(TINY, depth=4, num_classes=0))
    assert tuple(full(images(2, 32)).shape) == (2, 32)
    with pytest.raises(ValueError, match="out index 7"):
        vision_transformer(**dict(TINY, depth=4, features_only=True, out_indices=(7,)))


def test_features_only_loads_checkpoint_with_head():
    entry = VIT_FIXTURES["vit_token_32"]
    kwargs = dict(entry["kwargs"], features_only=True, out_indices=1)
    model = vision_transformer(**kwargs)
    load_timm_weights(model, load_checkpoint(fixture_path(entry["weights"])))


def _timm_state_dict():
    return dict(load_checkpoint(fixture_path(VIT_FIXTURES["vit_token_32"]["weights"])))


def test_checkpoint_missing_key_is_listed():
    model = build_from_fixture(VIT_FIXTURES["vit_token_32"])
    before = [np.asarray(w).copy() for w in model.weights]
    sd = _timm_state_dict()
    del sd["blocks.1.mlp.fc2.weight"]
    with pytest.raises(ValueError, match=r"missing keys:\n  blocks.1.mlp.fc2.weight"):
        load_timm_weights(model, sd)
    for a, b in zip(before, model.weights):  # nothing was assigned
        np.testing.assert_array_equal(a, np.asarray(b))
    missing, _ = load_timm_weights(model, sd, strict=False)
    assert missing == ["blocks.1.mlp.fc2.weight"]


def test_checkpoint_wrong_shape_is_listed():
    model = build_from_fixture(VIT_FIXTURES["vit_token_32"])
    sd = _timm_state_dict()
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:-3]
    sd["extra.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.weight: checkpoint \(141, 48\)"
                                         r"(.|\n)*unexpected keys:\n  extra.weight"):
        load_timm_weights(model, sd)


def test_checkpoint_format_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(os.path.join(tmp_path, "nope.safetensors"))
    bad = os.path.join(tmp_path, "w.h5")
    open(bad, "w").close()
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        load_checkpoint(bad)


def test_features_only_model_cut_before_the_end_loads_strictly():
    entry = VIT_FIXTURES["vit_token_32"]
    model = vision_transformer(**dict(entry["kwargs"], features_only=True, out_indices=(0,)))
    missing, unexpected = load_timm_weights(model, load_checkpoint(fixture_path(entry["weights"])))
    assert missing == [] and unexpected == []
    assert len(model.layers) < len(build_from_fixture(entry).layers)
