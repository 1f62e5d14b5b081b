import json

import keras
import numpy as np
import pytest

import keras_vit
from conftest import fixture_path, images, load_fixture_index
from helpers import check_keras_round_trip, create_model_without_weights
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.convert.core import weight_entries
from keras_vit.detection.detr import PositionalAttention, detr
from keras_vit.models.resnet import FrozenBatchNorm

FIXTURES = load_fixture_index("detr")
TINY = FIXTURES["detr_64x64"]["kwargs"]
KEYS = ("logits", "pred_boxes", "aux_logits", "aux_pred_boxes")


def _run_fixture(name, weights_key):
    entry = FIXTURES[name]
    model = detr(**entry["kwargs"], with_pixel_mask=entry["masked"], aux_outputs=True)
    load_timm_weights(model, load_checkpoint(fixture_path("detr", entry[weights_key])))
    data = np.load(fixture_path("detr", f"{name}.npz"))
    inputs = [data["x"], data["pixel_mask"]] if entry["masked"] else data["x"]
    return model, data, model(inputs, training=False)


@pytest.mark.parametrize("weights_key", ["weights", "official_weights"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_parity_with_transformers(name, weights_key):
    """HF DetrForObjectDetection's logits, boxes and (official-style) auxiliary outputs, from
    the HF file and from the same weights under the official module paths (max diff 4.8e-7)."""
    _, data, out = _run_fixture(name, weights_key)
    assert sorted(out) == sorted(KEYS)
    for key in KEYS:
        diff = float(np.max(np.abs(np.asarray(out[key]) - data[key])))
        assert diff <= 1e-4, f"{name} {key}: max abs diff {diff:.2e}"


def test_pixel_mask_changes_only_the_padded_image():
    model, data, out = _run_fixture("detr_64x96_mask", "weights")
    unmasked = model([data["x"], np.ones_like(data["pixel_mask"])], training=False)
    logits, unmasked_logits = np.asarray(out["logits"]), np.asarray(unmasked["logits"])
    np.testing.assert_allclose(logits[0], unmasked_logits[0], atol=1e-5)
    assert np.max(np.abs(logits[1] - unmasked_logits[1])) > 1e-2


def test_layer_names_are_the_official_keys():
    entry = FIXTURES["detr_64x64"]
    official = load_checkpoint(fixture_path("detr", entry["official_weights"]))
    model = detr(**entry["kwargs"])
    keys = {key for _, key, _ in weight_entries(model)}
    assert keys == {k for k in official if not k.endswith("num_batches_tracked")}
    assert "transformer.encoder.layers.0.self_attn.in_proj_weight" in keys
    assert "backbone.0.body.layer1.0.downsample.1.running_var" in keys


@pytest.mark.parametrize("name", ["detr_resnet50", "detr_resnet101", "detr_resnet50_dc5"])
def test_parameter_counts_equal_transformers(name):
    with open(fixture_path("detr", "param_counts.json")) as f:
        ref = json.load(f)[name]  # R50 and DC5 41,524,768; R101 60,464,672
    model = create_model_without_weights(name)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    body = model.get_layer("backbone.0.body")
    bn = sum(int(np.prod(w.shape)) for l in body.layers if isinstance(l, FrozenBatchNorm)
             for w in l.weights)
    assert bn == ref["frozen_batch_norm_buffers"]
    # transformers' parameters = ours without the frozen BatchNorm; conv1 and layer1 are not
    # trained (the official backbone.py), so the trainable count is 222,400 fewer: the
    # official main.py's printed 41,302,368 for R50.
    assert trainable + frozen - bn == ref["params"]
    stem_and_layer1 = sum(int(np.prod(w.shape)) for l in body.layers
                          if l.name.startswith(("conv1", "layer1")) for w in l.weights
                          if not isinstance(l, FrozenBatchNorm))
    assert stem_and_layer1 == 222_400 and trainable == ref["params"] - 222_400
    assert model.input_shape == (None, 800, 1344, 3)
    assert tuple(model.output["logits"].shape) == (None, 100, 92)
    assert all(isinstance(l, FrozenBatchNorm) for l in body.layers if "bn" in l.name)
    stride = 16 if name.endswith("dc5") else 32
    assert tuple(body.outputs[-1].shape[1:3]) == (800 // stride, 1344 // stride)


def test_create_model_pretrained_either_naming(tmp_path):
    """create_model(pretrained=PATH) loads the HF and the official file strictly."""
    entry = FIXTURES["detr_64x96"]
    data = np.load(fixture_path("detr", "detr_64x96.npz"))
    kwargs = dict(entry["kwargs"], img_size=(64, 96))
    for key in ("weights", "official_weights"):
        model = keras_vit.create_model("detr_resnet50", pretrained=fixture_path(
            "detr", entry[key]), **kwargs)
        np.testing.assert_allclose(np.asarray(model(data["x"])["logits"]), data["logits"],
                                   atol=1e-4)
    bad = dict(load_checkpoint(fixture_path("detr", entry["official_weights"])))
    bad["transformer.decoder.extra.weight"] = bad.pop("transformer.decoder.norm.weight")
    with pytest.raises(ValueError, match=r"(?s)missing keys:.*decoder\.norm\.weight.*"
                                         r"unexpected keys:.*decoder\.extra\.weight"):
        load_timm_weights(keras_vit.create_model("detr_resnet50", **kwargs), bad)


def test_any_keras_vit_backbone_builds_and_runs():
    """backbone= any classification name through features_only (here a small Swin)."""
    kwargs = {k: v for k, v in TINY.items() if k != "backbone_args"}
    model = keras_vit.create_model(
        "detr_resnet50", **dict(kwargs, img_size=32, backbone="swin_tiny_patch4_window7_224",
                                backbone_args=dict(embed_dim=24, depths=(2, 2),
                                                   num_heads=(1, 2), window_size=4)),
        with_pixel_mask=True, aux_outputs=True)
    assert tuple(model.get_layer("backbone.0.body").outputs[-1].shape[1:]) == (4, 4, 48)
    mask = np.ones((2, 32, 32), np.float32)
    mask[1, :, 16:] = 0
    out = model([images(2, 32), mask], training=False)
    assert tuple(out["logits"].shape) == (2, 10, 6)
    assert tuple(out["aux_pred_boxes"].shape) == (2, 1, 10, 4)
    boxes = np.asarray(out["pred_boxes"])
    assert np.all((boxes > 0) & (boxes < 1))


def test_positional_attention_is_multihead_attention_with_positions():
    """q = x + query_pos, k = context + key_pos, v = context: against numpy."""
    rng = np.random.default_rng(0)
    x, ctx = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 5, 8))
    qp, kp = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 5, 8))
    mask = np.ones((2, 1, 1, 5), bool)
    mask[1, ..., 3:] = False
    layer = PositionalAttention(8, 2)
    out = np.asarray(layer(x, ctx, query_pos=qp, key_pos=kp, attention_mask=mask))
    w = {n: (np.asarray(getattr(layer, n).kernel), np.asarray(getattr(layer, n).bias))
         for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
    lin = lambda t, n: t @ w[n][0] + w[n][1]  # noqa: E731
    heads = lambda t: t.reshape(2, -1, 2, 4).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = heads(lin(x + qp, "q_proj")), heads(lin(ctx + kp, "k_proj")), heads(lin(ctx, "v_proj"))
    logits = q @ k.transpose(0, 1, 3, 2) / 2.0 + np.where(mask, 0, -np.inf)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    ref = lin((attn @ v).transpose(0, 2, 1, 3).reshape(2, 3, 8), "out_proj")
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_round_trip_with_mask_and_aux(tmp_path):
    model = detr(**dict(TINY, img_size=(64, 96)), with_pixel_mask=True, aux_outputs=True)
    mask = np.ones((2, 64, 96), np.float32)
    mask[0, 40:] = 0
    check_keras_round_trip(model, [images(2, (64, 96)), mask], tmp_path)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="backbone stride 32; valid neighbours: 800 or 832"):
        keras_vit.create_model("detr_resnet50", img_size=(810, 1344))
    with pytest.raises(ValueError, match="backbone stride 16; valid neighbours: 48 or 64"):
        keras_vit.create_model("detr_resnet50_dc5", img_size=50)
    with pytest.raises(ValueError, match="num_queries must be a positive int"):
        detr(num_queries=0)
    with pytest.raises(ValueError, match="dilation"):
        detr(backbone="swin_tiny_patch4_window7_224", dilation=True)
