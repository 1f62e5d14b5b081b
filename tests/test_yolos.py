"""YOLOS (official hustvl/YOLOS; Hugging Face YolosForObjectDetection): parity in both
checkpoint namings at the checkpoint's size and another (resized position embeddings), exact
parameter counts, strict loading, the [DET] token order, no auxiliary outputs."""

import json

import numpy as np
import pytest

import keras_vit
from conftest import fixture_path, images, load_fixture_index
from helpers import build_from_fixture, create_model_without_weights
from keras_vit.convert import load_checkpoint, load_timm_weights, weight_entries
from keras_vit.convert.yolos import yolos_hf_to_official
from keras_vit.detection.yolos import yolos
from keras_vit.models.common import count_parameters
from keras_vit.registry import get_model_config, model_task

FIXTURES = load_fixture_index("yolos")


def fixture_weights(name):
    return load_checkpoint(fixture_path("yolos", FIXTURES[name]["weights"]))


def max_diffs(model, name):
    data = np.load(fixture_path("yolos", f"{name}.npz"))
    out = model(data["x"], training=False)
    diffs = []
    for key, ref in (("logits", data["y0"]), ("pred_boxes", data["y1"])):
        assert tuple(out[key].shape) == ref.shape, (key, out[key].shape, ref.shape)
        diffs.append(float(np.max(np.abs(np.asarray(out[key]) - ref))))
    return diffs


def loaded(name, **kwargs):
    model = build_from_fixture(dict(FIXTURES[name], kwargs=dict(FIXTURES[name]["kwargs"],
                                                                **kwargs)))
    load_timm_weights(model, fixture_weights(name))
    return model


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_reference_parity(name):
    """Logits and boxes within 1e-4 (measured ~1.5e-7): Hugging Face hub-file names (no
    mid-layer embeddings) and transformers-5 state_dict names (mid-layer embeddings) at 64x64
    and 64x96, the official names at 64x96 (the official Detector's outputs). At 64x96 the
    checkpoint's 8x8 position embeddings are resized to 8x12 on loading."""
    assert max(max_diffs(loaded(name), name)) <= 1e-4


def test_layer_norm_eps_is_each_references():
    # transformers' configs say 1e-12, the official LayerNorms 1e-6: the wrong one is
    # measurably further off on these randomised weights.
    own = max(max_diffs(loaded("yolos_official_64x96"), "yolos_official_64x96"))
    other = max(max_diffs(loaded("yolos_official_64x96", norm_eps=1e-12), "yolos_official_64x96"))
    assert own < 5e-7 and other > 2 * own, (own, other)


def test_layer_names_are_the_official_checkpoint_keys():
    for name in ("yolos_official_64x96", "yolos_official_mid_64x96"):
        model = build_from_fixture(FIXTURES[name])
        keys = {key for _, key, _ in weight_entries(model)}
        assert keys == set(fixture_weights(name)), name
    assert {"backbone.cls_token", "backbone.det_token", "backbone.pos_embed",
            "backbone.mid_pos_embed", "backbone.patch_embed.proj.weight",
            "backbone.blocks.0.attn.qkv.weight", "backbone.norm.bias",
            "class_embed.layers.2.weight", "bbox_embed.layers.0.bias"} <= keys


def test_hugging_face_names_become_the_official_ones():
    hf = fixture_weights("yolos_hf_mid_64")
    assert "vit.encoder.interpolation.mid_position_embeddings" in hf
    official = yolos_hf_to_official(hf)
    model = build_from_fixture(FIXTURES["yolos_hf_mid_64"])
    assert set(official) == {key for _, key, _ in weight_entries(model)}
    # [q; k; v] rows, as the official qkv(x).reshape(B, N, 3, heads, d).
    qkv = official["backbone.blocks.1.attn.qkv.weight"]
    for i, part in enumerate(("query", "key", "value")):
        ref = hf[f"vit.encoder.layer.1.attention.attention.{part}.weight"]
        np.testing.assert_array_equal(qkv[32 * i:32 * (i + 1)], ref)


def test_det_tokens_follow_cls_and_embeddings_are_reordered():
    """The model's sequence is [CLS, DET, patches]: its position embedding is the
    checkpoint's [CLS, patches, DET] rows reordered (same grid: nothing resized); the
    mid-layer rows likewise, row i of the checkpoint's stack after block i."""
    sd = fixture_weights("yolos_official_mid_64x96")
    model = build_from_fixture(dict(FIXTURES["yolos_official_mid_64x96"],
                                    kwargs=dict(FIXTURES["yolos_official_mid_64x96"]["kwargs"],
                                                img_size=64)))
    load_timm_weights(model, sd)
    for layer, ref in ((model.get_layer("backbone.pos_embed"), sd["backbone.pos_embed"]),
                       (model.get_layer("backbone.mid_pos_embed.1"),
                        sd["backbone.mid_pos_embed"][1])):
        ref = np.asarray(ref)
        ours = np.asarray(layer.pos_embed)
        np.testing.assert_array_equal(ours[:, :11], np.concatenate([ref[:, :1], ref[:, -10:]], 1))
        np.testing.assert_array_equal(ours[:, 11:], ref[:, 1:-10])
    tokens = model.get_layer("backbone.prefix_tokens").tokens
    np.testing.assert_array_equal(np.asarray(tokens[1]), np.asarray(sd["backbone.det_token"]))
    # Depth 3: mid-layer embeddings after blocks 0 and 1, none after the last.
    names = {layer.name for layer in model.layers}
    assert {"backbone.mid_pos_embed.0", "backbone.mid_pos_embed.1"} <= names
    assert "backbone.mid_pos_embed.2" not in names


def test_checkpoint_of_an_unknown_grid_is_refused():
    sd = dict(fixture_weights("yolos_official_64x96"))
    sd["backbone.pos_embed"] = sd["backbone.pos_embed"][:, 16:]  # 48 patch rows: 6x8?
    model = build_from_fixture(FIXTURES["yolos_official_64x96"])
    with pytest.raises(ValueError, match="48-patch position embedding") as e:
        load_timm_weights(model, sd)
    assert "init_pe_size" in str(e.value)


def test_strict_loading_lists_bad_keys():
    sd = dict(fixture_weights("yolos_hf_64"))
    del sd["vit.embeddings.detection_tokens"]
    sd["vit.extra"] = sd["vit.layernorm.weight"]
    model = build_from_fixture(FIXTURES["yolos_hf_64"])
    with pytest.raises(ValueError) as e:
        load_timm_weights(model, sd)
    assert "backbone.det_token" in str(e.value) and "vit.extra" in str(e.value)


def test_create_model_loads_either_naming(tmp_path):
    """create_model(name, pretrained=PATH) with a small config: HF's and the official file."""
    for name in ("yolos_hf_mid_64x96", "yolos_official_mid_64x96"):
        kwargs = dict(FIXTURES[name]["kwargs"])
        model = keras_vit.create_model("yolos_s", pretrained=fixture_path(
            "yolos", FIXTURES[name]["weights"]), **kwargs)
        assert model_task(model) == "detection"
        assert max(max_diffs(model, name)) <= 1e-4


def test_full_size_parameter_counts():
    """Exactly transformers' and the official Detector's counts (param_counts.json) at the
    size each checkpoint's embeddings were made for (YOLOS-Ti's 800x1333 is the 50x83 grid of
    the default 800x1328 input); 92 logits (91 classes + no-object), 100 [DET] tokens."""
    with open(fixture_path("yolos", "param_counts.json")) as f:
        counts = json.load(f)
    assert counts["yolos_ti"]["transformers"] == 6_488_736
    for name, size in (("yolos_ti", None), ("yolos_s", (512, 864)),
                       ("yolos_base", (800, 1344))):
        ref = counts[name]
        assert ref["official"] == ref["transformers"]
        model = create_model_without_weights(name, **({"img_size": size} if size else {}))
        assert count_parameters(model) == ref["transformers"], (name, count_parameters(model))
        assert tuple(model.output["logits"].shape) == (None, 100, 92)
        assert tuple(model.output["pred_boxes"].shape) == (None, 100, 4)
        config = get_model_config(name)
        assert config["task"] == "detection" and tuple(config["input_size"]) == (800, 1328)


def test_no_auxiliary_outputs_and_size_checks():
    with pytest.raises(ValueError, match="no decoder"):
        yolos(aux_outputs=True)
    with pytest.raises(ValueError, match="valid neighbours: 800 or 816"):
        yolos(img_size=(810, 1328))


def test_pixel_mask_is_accepted_and_unread():
    # The official Detector runs its backbone on samples.tensors alone.
    name = "yolos_hf_64"
    plain = loaded(name)
    masked = build_from_fixture(dict(FIXTURES[name], kwargs=dict(FIXTURES[name]["kwargs"],
                                                                 with_pixel_mask=True)))
    load_timm_weights(masked, fixture_weights(name))
    x = images(2, (64, 64))
    mask = np.zeros((2, 64, 64), np.float32)
    mask[:, :40, :48] = 1
    a, b = plain(x, training=False), masked([x, mask], training=False)
    for key in ("logits", "pred_boxes"):
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_pretrained_with_other_classes_keeps_the_body_and_resets_the_class_head():
    """create_model(num_classes=K, pretrained=PATH): every weight loads but the class MLP's
    last layer, whose output axis is the classes + no-object (fine-tuning, as timm's heads)."""
    import json
    import os

    import keras_vit
    from conftest import fixture_path
    from keras_vit.convert import load_checkpoint

    with open(fixture_path("yolos", "fixtures.json")) as f:
        entry = json.load(f)["yolos_hf_64"]
    kwargs = {k: v for k, v in entry["kwargs"].items() if k != "num_classes"}
    path = fixture_path("yolos", entry["weights"])
    model = keras_vit.create_model("yolos_ti", pretrained=path, num_classes=3, **kwargs)
    assert model.output["logits"].shape[-1] == 4
    reference = keras_vit.create_model("yolos_ti", pretrained=path, **entry["kwargs"])
    state = load_checkpoint(path)
    assert os.path.exists(path) and any("class" in k for k in state)
    by_path = {w.path: w for w in reference.weights}
    kept = [w for w in model.weights if w.path in by_path and w.shape == by_path[w.path].shape]
    assert len(kept) == len(model.weights) - 2  # the last class layer's kernel and bias
    for w in kept:
        np.testing.assert_array_equal(np.asarray(w), np.asarray(by_path[w.path]))
