"""Deformable DETR (keras_vit/detection/deformable_detr.py) against Hugging Face transformers'
``DeformableDetrForObjectDetection`` (fixtures by tools/fixtures/deformable_detr.py: a tiny
config, timm ResNet-50 layout with one bottleneck per stage, random weights and BatchNorm
statistics, a padded second image): plain, box refinement and two-stage at 64x64 and 64x96,
in transformers' naming and the official one (plain and box-refine official references are
the official fundamentalvision/Deformable-DETR code's outputs on the renamed weights, which
equal transformers' within 7e-7); the full-size parameter counts of transformers 5.23/5.24;
strict loading through create_model(pretrained=PATH); aux outputs; TFLite."""

import json
import os

import numpy as np
import keras
import pytest

import keras_vit
from keras_vit.detection.deformable_detr import deformable_detr
from keras_vit.models.resnet import FrozenBatchNorm

from helpers import create_model_without_weights

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "deformable_detr")
with open(os.path.join(FIXTURES, "fixtures.json")) as f:
    INDEX = json.load(f)

# transformers 5.23/5.24, 91 classes, random init (the numbers).
HF_COUNTS = {"deformable_detr_resnet50": 40_069_665,
             "deformable_detr_resnet50_box_refine": 40_732_725,
             "deformable_detr_resnet50_two_stage": 41_181_529}
# transformers 5.24 ties class_embed.1-5 to class_embed.0 in box-refinement mode (its
# _tied_weights_keys; two-stage unties them), so it counts one class head where the official
# code has six clones (_get_clones in models/deformable_detr.py); the box-refine checkpoints
# hold six different heads. The Keras model has the official per-layer heads: the official
# count (40,849,660, recorded by the tools script from the official code).
CLASS_HEAD = 256 * 91 + 91
COUNTS = dict(HF_COUNTS, deformable_detr_resnet50_box_refine=HF_COUNTS[
    "deformable_detr_resnet50_box_refine"] + 5 * CLASS_HEAD)


def torch_parameter_count(model):
    """torch's count: FrozenBatchNorm's four tensors are buffers there."""
    frozen = sum(int(np.prod(v.shape)) for layer in model._flatten_layers()
                 if isinstance(layer, FrozenBatchNorm) for v in layer.weights)
    return sum(int(np.prod(v.shape)) for v in model.weights) - frozen


def _fixture_model(name):
    entry = INDEX[name]
    kwargs = dict(entry["kwargs"])
    model = deformable_detr(**kwargs)
    state = keras_vit.load_checkpoint(os.path.join(FIXTURES, entry["weights"]))
    keras_vit.load_timm_weights(model, state)
    return model


@pytest.mark.parametrize("name", sorted(INDEX))
def test_parity_with_transformers(name):
    ref = np.load(os.path.join(FIXTURES, f"{name}.npz"))
    model = _fixture_model(name)
    out = model([ref["x"].astype(np.float32), ref["pixel_mask"].astype(np.float32)])
    np.testing.assert_allclose(np.asarray(out["logits"]), ref["logits"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["pred_boxes"]), ref["pred_boxes"], atol=1e-4)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_full_size_parameter_counts(name):
    model = create_model_without_weights(name)
    assert model.input_shape[1:] == (800, 1344, 3)
    assert torch_parameter_count(model) == COUNTS[name]


def _fixture_inputs(name):
    ref = np.load(os.path.join(FIXTURES, f"{name}.npz"))
    return [ref["x"].astype(np.float32), ref["pixel_mask"].astype(np.float32)], ref


@pytest.mark.parametrize("naming", ["hf", "official"])
def test_create_model_loads_either_naming_strictly(naming, tmp_path):
    """create_model(pretrained=PATH) tells the namings apart by their keys; a stray key and
    a missing one are both listed."""
    from safetensors.numpy import load_file, save_file

    name = f"deformable_detr_box_refine_{naming}_64x96"
    entry = INDEX[name]
    kwargs = {k: v for k, v in entry["kwargs"].items() if k not in ("with_box_refine",
                                                                    "two_stage")}
    path = os.path.join(FIXTURES, entry["weights"])
    model = keras_vit.create_model("deformable_detr_resnet50_box_refine", pretrained=path,
                                   **kwargs)
    inputs, ref = _fixture_inputs(name)
    np.testing.assert_allclose(np.asarray(model(inputs)["logits"]), ref["logits"], atol=1e-4)
    state = load_file(path)
    level_key = "model.level_embed" if naming == "hf" else "transformer.level_embed"
    dropped = next(k for k in state if "linear2.bias" in k or "mlp.fc2.bias" in k)
    del state[dropped]
    state["transformer.encoder.layers.0.stray"] = state[level_key][0]
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys:[\s\S]*linear2\.bias[\s\S]*"
                                         r"unexpected keys:[\s\S]*layers\.0\.stray"):
        keras_vit.create_model("deformable_detr_resnet50_box_refine",
                               pretrained=str(tmp_path / "bad.safetensors"), **kwargs)


def test_aux_outputs_are_the_earlier_decoder_layers():
    """The plain model's heads are shared: its first decoder layer's auxiliary output is what
    the same weights give through a one-layer decoder."""
    name = "deformable_detr_plain_hf_64x96"
    entry = INDEX[name]
    state = keras_vit.load_checkpoint(os.path.join(FIXTURES, entry["weights"]))
    two = deformable_detr(**dict(entry["kwargs"], aux_outputs=True))
    keras_vit.load_timm_weights(two, state)
    one = deformable_detr(**dict(entry["kwargs"], dec_layers=1))
    keras_vit.load_timm_weights(one, {k: v for k, v in state.items()
                                      if "decoder.layers.1." not in k}, strict=False)
    inputs, ref = _fixture_inputs(name)
    out, first = two(inputs), one(inputs)
    assert tuple(out["aux_logits"].shape) == (2, 1, 5, 3)
    np.testing.assert_allclose(np.asarray(out["logits"]), ref["logits"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["aux_logits"])[:, 0], np.asarray(first["logits"]),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["aux_pred_boxes"])[:, 0],
                               np.asarray(first["pred_boxes"]), atol=1e-5)


def test_two_stage_encoder_proposals_and_padding():
    """Two-stage aux outputs: a proposal per encoder pixel; padded pixels' proposals are
    +inf logits (sigmoid 1) as the reference's masked_fill, and the decoder's outputs stay
    those of the fixture."""
    name = "deformable_detr_two_stage_hf_64x96"
    entry = INDEX[name]
    model = deformable_detr(**dict(entry["kwargs"], aux_outputs=True))
    keras_vit.load_timm_weights(model, keras_vit.load_checkpoint(
        os.path.join(FIXTURES, entry["weights"])))
    inputs, ref = _fixture_inputs(name)
    out = model(inputs)
    np.testing.assert_allclose(np.asarray(out["pred_boxes"]), ref["pred_boxes"], atol=1e-4)
    seq = 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2
    assert tuple(out["enc_logits"].shape) == (2, seq, 3)
    boxes = np.asarray(out["enc_pred_boxes"])
    # Image 1 is padded from row 40 and column 56 on: C3 (stride 8) rows 5.. and cols 7.. .
    c3 = boxes[1, :96].reshape(8, 12, 4)
    assert (c3[5:, :] == 1).all() and (c3[:, 7:] == 1).all() and (c3[:5, :7] < 1).all()


def test_tflite_with_pixel_mask(tmp_path):
    from keras_vit.export import export_tflite

    name = "deformable_detr_two_stage_hf_64x64"
    model = _fixture_model(name)
    inputs, _ = _fixture_inputs(name)
    report = export_tflite(model, str(tmp_path / "ddetr.tflite"), representative_data=[inputs])
    assert set(report["outputs"]) == {"logits", "pred_boxes"}


def _hub_name(key):
    """transformers 5's state_dict() name -> the name its save_pretrained writes."""
    return (key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
            .replace(".mlp.fc", ".fc").replace(".self_attn.o_proj.", ".self_attn.out_proj."))


@pytest.mark.parametrize("variant", ["plain", "box_refine", "two_stage"])
def test_save_pretrained_naming_loads(variant):
    """The hub files' naming (recorded from save_pretrained: tied heads written once, e.g.
    box refinement's class_embed.0 only and its boxes under model.decoder) loads strictly and
    gives the fixture's outputs."""
    with open(os.path.join(FIXTURES, "save_pretrained_keys.json")) as f:
        hub_keys = json.load(f)[variant]
    name = f"deformable_detr_{variant}_hf_64x64"
    entry = INDEX[name]
    state = {_hub_name(k): v for k, v in keras_vit.load_checkpoint(
        os.path.join(FIXTURES, entry["weights"])).items()}
    assert set(hub_keys) <= set(state)
    model = deformable_detr(**entry["kwargs"])
    keras_vit.load_timm_weights(model, {k: state[k] for k in hub_keys})
    inputs, ref = _fixture_inputs(name)
    out = model(inputs)
    np.testing.assert_allclose(np.asarray(out["logits"]), ref["logits"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["pred_boxes"]), ref["pred_boxes"], atol=1e-4)


def test_counts_recorded_from_the_references():
    with open(os.path.join(FIXTURES, "param_counts.json")) as f:
        recorded = json.load(f)
    assert recorded == {"transformers": HF_COUNTS, "official": COUNTS}


def test_initialisation_is_the_official():
    """Class bias at prior 0.01, box heads' last Linear zero with bias (0, 0, -2, -2) on the
    first/shared head, level embedding and queries N(0, 1)."""
    kwargs = dict(INDEX["deformable_detr_box_refine_hf_64x64"]["kwargs"])
    model = deformable_detr(**kwargs)
    get = {layer.name: layer for layer in model.layers}
    np.testing.assert_allclose(np.asarray(get["class_embed.1"].bias), -np.log(99), rtol=1e-6)
    first, second = get["bbox_embed.0"].linears[-1], get["bbox_embed.1"].linears[-1]
    assert not np.any(np.asarray(first.kernel)) and not np.any(np.asarray(second.kernel))
    np.testing.assert_array_equal(np.asarray(first.bias), [0, 0, -2, -2])
    np.testing.assert_array_equal(np.asarray(second.bias), [0, 0, 0, 0])
    queries = np.asarray(get["query_embed"].weight)
    assert queries.shape == (5, 64) and 0.7 < queries.std() < 1.3


def test_inverse_sigmoid_runs_in_an_int8_file(tmp_path):
    """Box refinement's inverse sigmoid is log(x1) - log(x2), not the official log(x1 / x2):
    in an int8 file the clipped 1 - x quantized to zero and the int8 DIV aborted LiteRT.
    The same values in float, and an int8 file that runs on boxes touching 1."""
    from keras_vit.detection.deformable_detr import inverse_sigmoid
    from keras_vit.export import export_tflite

    x = np.array([0.0, 1e-6, 0.2, 0.5, 0.9, 1.0 - 1e-6, 1.0], np.float32)
    clipped = np.clip(x, 1e-5, None), np.clip(1.0 - x, 1e-5, None)
    np.testing.assert_allclose(np.asarray(inverse_sigmoid(x)),
                               np.log(clipped[0] / clipped[1]), rtol=1e-6, atol=1e-6)
    inputs = keras.Input((8,))
    boxes = keras.layers.Activation("sigmoid")(keras.layers.Dense(8)(inputs))
    model = keras.Model(inputs, keras.layers.Lambda(inverse_sigmoid)(boxes))
    data = 6.0 * np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    report = export_tflite(model, str(tmp_path / "inv.tflite"), "int8", representative_data=data,
                           verify=False)
    from ai_edge_litert.interpreter import Interpreter

    from keras_vit.export.tflite import verify_tflite

    ops_used = {op["op_name"] for op in Interpreter(report["path"])._get_ops_details()}
    assert "LOG" in ops_used and "DIV" not in ops_used  # the official form makes an int8 DIV
    assert np.isfinite(verify_tflite(report["path"], model, data[:8])["max_abs_diff"])


def test_trainable_batch_norm_for_training_from_scratch():
    """frozen_batch_norm=False: the backbone's BatchNorm trains (batch statistics in training,
    gamma/beta trainable), as a from-scratch run needs; the default stays the official
    FrozenBatchNorm2d."""
    kwargs = dict(img_size=64, backbone_layers=(1, 1, 1, 1), backbone_widths=(4, 8, 8, 16),
                  embed_dim=32, num_heads=2, enc_layers=1, dec_layers=1, num_queries=5,
                  num_classes=3, ffn_dim=32)
    frozen = deformable_detr(**kwargs)
    trainable = deformable_detr(**kwargs, frozen_batch_norm=False)
    assert any(isinstance(l, FrozenBatchNorm) for l in frozen._flatten_layers())
    norms = [l for l in trainable._flatten_layers()
             if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and not any(isinstance(l, FrozenBatchNorm) for l in trainable._flatten_layers())
    assert all(l.gamma.trainable and l.beta.trainable for l in norms)
