"""Deformable DETR (keras_vit/detection/deformable_detr.py) against Hugging Face transformers'
``DeformableDetrForObjectDetection`` (fixtures by tools/fixtures/deformable_detr.py: a tiny
config, timm ResNet-50 layout with one bottleneck per stage, random weights and BatchNorm
statistics, a padded second image): plain, box refinement and two-stage at 64x64 and 64x96,
in transformers' naming and the official one; the full-size parameter counts of transformers
5.23/5.24; strict loading through create_model(pretrained=PATH); aux outputs; TFLite."""

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
# hold six different heads. The Keras model has the official per-layer heads.
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
