"""SegFormer (official NVlabs/SegFormer; Hugging Face SegformerForSemanticSegmentation):
parity in both checkpoint namings, exact parameter counts, strict loading, H/4 logits."""

import json

import numpy as np
import pytest

import keras_vit
from conftest import fixture_path, images, load_fixture_index
from helpers import build_from_fixture, create_model_without_weights
from keras_vit.convert import load_checkpoint, load_timm_weights, weight_entries
from keras_vit.convert.segformer import segformer_hf_to_official
from keras_vit.models.common import count_parameters
from keras_vit.segmentation.segformer import segformer

FIXTURES = load_fixture_index("segformer")
# The fixtures' small configuration (tools/fixtures/segformer.py TINY).
TINY = {k: v for k, v in FIXTURES["segformer_official_64x96"]["kwargs"].items()
        if k != "img_size"}


def param_counts():
    with open(fixture_path("segformer", "param_counts.json")) as f:
        return json.load(f)


def reference_outputs(name):
    data = np.load(fixture_path("segformer", f"{name}.npz"))
    return data["x"], data["y0"]


def max_diff(model, name):
    x, y = reference_outputs(name)
    out = np.asarray(model(x, training=False))
    assert out.shape == y.shape, (out.shape, y.shape)
    return float(np.max(np.abs(out - y)))


def fixture_weights(name):
    return load_checkpoint(fixture_path("segformer", FIXTURES[name]["weights"]))


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_reference_parity(name):
    """Official names (the official code's logits, eps 1e-6) at 64x96; Hugging Face's hub-file
    names at 64x64 and its transformers-5 state_dict names at 64x96 (its logits, eps 1e-5)."""
    model = build_from_fixture(FIXTURES[name])
    load_timm_weights(model, fixture_weights(name), features_only=False)
    assert max_diff(model, name) <= 1e-4


def test_layer_norm_eps_is_each_references():
    # The official blocks and stage norms use eps 1e-6, Hugging Face's 1e-5: each fixture is
    # matched closer with its own (~1.5e-7) than with the other's (~1.3e-6).
    for name, own, other in (("segformer_official_64x96", 1e-6, 1e-5),
                             ("segformer_hf_state_dict_64x96", 1e-5, 1e-6)):
        diffs = {}
        for eps in (own, other):
            model = build_from_fixture(dict(FIXTURES[name], kwargs=dict(
                FIXTURES[name]["kwargs"], norm_eps=eps)))
            load_timm_weights(model, fixture_weights(name), features_only=False)
            diffs[eps] = max_diff(model, name)
        assert diffs[own] < 5e-7 and diffs[other] > 2 * diffs[own], (name, diffs)


def test_layer_names_are_the_official_checkpoint_keys():
    sd = fixture_weights("segformer_official_64x96")
    official = {k for k in sd if not k.endswith("num_batches_tracked")}
    model = build_from_fixture(FIXTURES["segformer_official_64x96"])
    keys = {key for _, key, _ in weight_entries(model)}
    # conv_seg: mmseg's BaseDecodeHead creates it, SegFormerHead never uses it.
    assert official - keys == {"decode_head.conv_seg.weight", "decode_head.conv_seg.bias"}
    assert keys <= official
    for key in ("backbone.patch_embed1.proj.weight", "backbone.block1.0.attn.q.weight",
                "backbone.block1.0.attn.kv.weight", "backbone.block2.1.mlp.dwconv.dwconv.weight",
                "backbone.norm4.bias", "decode_head.linear_c4.proj.weight",
                "decode_head.linear_fuse.conv.weight", "decode_head.linear_fuse.bn.running_var",
                "decode_head.linear_pred.weight"):
        assert key in keys, key


def test_both_hugging_face_namings_through_create_model():
    """create_model(pretrained=PATH) takes either transformers naming (told apart from the
    official one by the "segformer." prefix), and an mmseg checkpoint's {"meta", "state_dict"}."""
    hub = fixture_weights("segformer_hf_64")
    assert "segformer.encoder.block.0.0.attention.self.query.weight" in hub
    new = fixture_weights("segformer_hf_state_dict_64x96")
    assert "segformer.stages.0.blocks.0.attention.q_proj.weight" in new
    # The same weights in both files: one official dict, key and value joined into kv.
    a, b = segformer_hf_to_official(hub), segformer_hf_to_official(new)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    kv = np.asarray(a["backbone.block1.0.attn.kv.weight"])
    np.testing.assert_array_equal(kv[:8], hub["segformer.encoder.block.0.0.attention.self.key.weight"])
    np.testing.assert_array_equal(kv[8:], hub["segformer.encoder.block.0.0.attention.self.value.weight"])
    kwargs = FIXTURES["segformer_hf_64"]["kwargs"]
    model = keras_vit.create_model("segformer_b0", pretrained=fixture_path(
        "segformer", FIXTURES["segformer_hf_64"]["weights"]), **kwargs)
    assert max_diff(model, "segformer_hf_64") <= 1e-4


def test_mmseg_checkpoint_layout_loads():
    # mmseg saves {"meta": ..., "state_dict": ...}; the unused conv_seg is dropped on load.
    name = "segformer_official_64x96"
    checkpoint = {"meta": {"CLASSES": ["a", "b", "c", "d", "e"]},
                  "state_dict": fixture_weights(name)}
    model = keras_vit.create_model("segformer_b0", **FIXTURES[name]["kwargs"])
    load_timm_weights(model, checkpoint)
    assert max_diff(model, name) <= 1e-4


def test_strict_loading_lists_every_bad_key():
    kwargs = FIXTURES["segformer_official_64x96"]["kwargs"]
    official = dict(fixture_weights("segformer_official_64x96"))
    official["backbone.block1.0.attn.bogus.weight"] = np.zeros(3, np.float32)
    del official["decode_head.linear_fuse.bn.running_mean"]
    official["backbone.norm2.weight"] = np.zeros(7, np.float32)
    model = keras_vit.create_model("segformer_b0", **kwargs)
    with pytest.raises(ValueError) as error:
        load_timm_weights(model, official)
    message = str(error.value)
    for text in ("unexpected keys:\n  backbone.block1.0.attn.bogus.weight",
                 "missing keys:\n  decode_head.linear_fuse.bn.running_mean",
                 "backbone.norm2.weight: checkpoint (7,)"):
        assert text in message, message
    hub = dict(fixture_weights("segformer_hf_64"))
    hub["segformer.encoder.block.0.0.attention.self.bogus.weight"] = np.zeros(3, np.float32)
    del hub["segformer.encoder.block.1.1.attention.self.value.bias"]
    model = keras_vit.create_model("segformer_b0", **FIXTURES["segformer_hf_64"]["kwargs"])
    with pytest.raises(ValueError) as error:
        load_timm_weights(model, hub)
    message = str(error.value)
    # Errors name the official keys: an unknown key renamed as far as its known parts go;
    # a key Linear without its value half stays apart, and kv is missing.
    for text in ("unexpected keys:\n  backbone.block1.0.attention.self.bogus.weight\n"
                 "  backbone.block2.1.attn.k.bias",
                 "missing keys:\n  backbone.block2.1.attn.kv.bias"):
        assert text in message, message


@pytest.mark.parametrize("name", sorted(param_counts()))
def test_full_size_parameter_count_equals_transformers(name):
    ref = param_counts()[name]
    model = create_model_without_weights(name)
    assert count_parameters(model) == ref["params"], (count_parameters(model), ref["params"])
    # The official model has the same parameters plus its unused conv_seg.
    assert ref["official_params"] - ref["official_conv_seg_params"] == ref["params"]
    size = keras_vit.get_model_config(name)["input_size"]
    assert model.input_shape == (None, size, size, 3)
    assert model.output_shape == (None, size // 4, size // 4, ref["num_classes"])


def test_issue_parameter_counts():
    counts = {name: c["params"] for name, c in param_counts().items()}
    assert counts["segformer_b0"] == 3_752_694
    assert counts["segformer_b1"] == 13_715_798
    assert counts["segformer_b2"] == 27_461_974


def test_registered_variants():
    assert keras_vit.list_models("segformer*") == [f"segformer_b{i}" for i in range(6)]
    for name in keras_vit.list_models("segformer*"):
        cfg = keras_vit.get_model_config(name)
        assert (cfg["task"], cfg["num_classes"], cfg["family"]) == ("segmentation", 150,
                                                                      "segformer")
        assert cfg["input_size"] == (640 if name == "segformer_b5" else 512)
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("size", [(64, 96), (96, 64)])
def test_logits_at_a_quarter_of_the_input(size):
    model = segformer(img_size=size, **TINY)
    h, w = size
    assert tuple(model(images(1, size)).shape) == (1, h // 4, w // 4, TINY["num_classes"])


def test_invalid_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"network stride .* 32; valid neighbours: 480 or 512"):
        keras_vit.create_model("segformer_b0", img_size=500)
    with pytest.raises(ValueError, match="four stages"):
        segformer(**dict(TINY, depths=(1, 1, 1)))
    with pytest.raises(ValueError, match="decoder_dim"):
        segformer(**dict(TINY, decoder_dim=0))
    with pytest.raises(ValueError, match="smaller than its sr_ratio 16"):
        segformer(**dict(TINY, img_size=32, sr_ratios=(16, 4, 2, 1)))
