"""SETR: parity with the official code (fudan-zvg/SETR), parameter counts, official naming.

Fixtures (tools/fixtures/setr.py): the official VisionTransformer / VIT_MLA backbones and
VisionTransformerUpHead / VIT_MLAHead / VIT_MLA_AUXIHead heads, imported unchanged with
stubs for what they import from mmcv / mmseg (SyncBN -> BatchNorm2d), random weights and
BatchNorm statistics, eval mode: naive at 32 and 48 px, PUP and MLA at 32 px (ViT depth 4,
width 32, patch 8), each with and without the auxiliary heads. The heads' fixed 256
channels are narrowed there to 16 (modules of the same kind, the forward unchanged).

Parameter counts (official_param_counts.json, from the official code at the variants'
ADE20K config: 512 x 512, 150 classes, with auxiliary heads) against the paper's table
(SETR-Naive 305.67 M, SETR-PUP 318.31 M, SETR-MLA 310.57 M): the official totals round to
the paper's exactly. The Keras models have fewer, by design and exactly by these parts:
- every official head holds mmseg's BaseDecodeHead ``conv_seg`` (a 1x1 conv 512 -> 150,
  76,950 parameters) that SETR's heads never call: not built here (the converter drops
  the keys). Naive: 4 heads (307,800), PUP and MLA: 5 (384,750);
- the inference model (aux_heads=False) has no auxiliary heads: the checkpoint's
  auxiliary_head.* are dropped too. With aux_heads=True the Keras count is the official
  total minus conv_seg: ViT-L naive 305,361,496, PUP 317,922,542, MLA 310,184,086.
"""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import keras_vit
from conftest import fixture_path, images, load_fixture_index
from helpers import (
    build_from_fixture,
    check_keras_round_trip,
    check_tflite_fp32,
    check_timm_parity,
    create_model_without_weights,
)
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.models.common import count_parameters
from keras_vit.segmentation.setr import align_corners_matrix, setr

FIXTURES = load_fixture_index("setr")
PAPER_PARAMS_M = {"setr_naive_vit_large": 305.67, "setr_pup_vit_large": 318.31,
                  "setr_mla_vit_large": 310.57}
CONV_SEG = 512 * 150 + 150  # one unused BaseDecodeHead.conv_seg at 150 classes


def _official_counts():
    with open(fixture_path("setr", "official_param_counts.json")) as f:
        return json.load(f)


def _state_dict(name):
    return dict(load_checkpoint(fixture_path("setr", FIXTURES[name]["weights"])))


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_official_parity(name):
    check_timm_parity("setr", name, FIXTURES[name])


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_official_counts_are_the_papers(name):
    # The paper's table counts the ADE20K models with their auxiliary heads and conv_seg.
    assert round(_official_counts()[name]["params"] / 1e6, 2) == PAPER_PARAMS_M[name]


@pytest.mark.parametrize("name", sorted(_official_counts()))
def test_full_size_parameter_count_equals_official(name):
    ref = _official_counts()[name]
    cfg = keras_vit.get_model_config(name)
    assert (cfg["input_size"], cfg["num_classes"], cfg["task"]) == (512, 150, "segmentation")
    train = create_model_without_weights(name, aux_heads=True)
    assert len(train.outputs) == 1 + ref["num_aux_heads"]
    assert count_parameters(train) == ref["params"] - ref["conv_seg"]
    infer = create_model_without_weights(name)
    assert infer.output_shape == (None, 512, 512, 150)
    assert count_parameters(infer) == ref["backbone"] + ref["decode_head"] - CONV_SEG


def test_every_registered_setr_has_an_official_count():
    assert keras_vit.list_models("setr_*") == sorted(_official_counts())


def test_pretrained_path_loads_the_official_naming_strictly(tmp_path):
    entry = FIXTURES["mla_32_aux"]
    sd = _state_dict("mla_32_aux")
    assert any(".conv_seg." in k for k in sd) and any(k.startswith("auxiliary_head.") for k in sd)
    path = str(tmp_path / "setr.safetensors")
    save_file(sd, path)
    kwargs = {k: v for k, v in entry["kwargs"].items() if k != "decoder"}
    data = np.load(fixture_path("setr", "mla_32_aux.npz"))
    # The training model and the inference one (auxiliary_head.* left out) from one file.
    train = keras_vit.create_model("setr_mla_vit_large", pretrained=path, **kwargs)
    infer = keras_vit.create_model("setr_mla_vit_large", pretrained=path,
                                   **dict(kwargs, aux_heads=False))
    np.testing.assert_allclose(np.asarray(train(data["x"])[1]), data["y1"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(infer(data["x"])), data["y0"], atol=1e-4)
    # Strict for everything else: a missing and an unexpected key are both named.
    bad = dict(sd)
    bad.pop("backbone.mla.mla_p3.1.running_var")
    bad["decode_head.extra.weight"] = np.zeros(3, np.float32)
    save_file(bad, path)
    both = (r"(?s)missing keys:.*backbone\.mla\.mla_p3\.1\.running_var.*unexpected keys:.*"
            r"decode_head\.extra\.weight")
    with pytest.raises(ValueError, match=both):
        keras_vit.create_model("setr_mla_vit_large", pretrained=path, **kwargs)
    # Built by the builder under an unregistered name, load_timm_weights cannot tell the
    # logits from a features_only pyramid: features_only=False keeps it strict.
    with pytest.raises(ValueError, match=both):
        load_timm_weights(build_from_fixture(entry), bad, features_only=False)


def test_layer_names_are_the_official_module_paths():
    entry = FIXTURES["pup_32_aux"]
    model = build_from_fixture(entry)
    sd = _state_dict("pup_32_aux")
    official = {k for k in sd if ".conv_seg." not in k and not k.endswith("num_batches_tracked")}
    from keras_vit.convert import weight_entries

    assert {key for _, key, _ in weight_entries(model)} == official


def test_output_sizes_non_square():
    """Each side scaled on its own (the official heads assume square inputs): naive and MLA
    at the input size, PUP's main head at 16x the token grid, its auxiliary heads at the
    input size."""
    tiny = dict(img_size=(32, 48), patch_size=8, embed_dim=16, depth=2, num_heads=2,
                num_classes=3, head_channels=8, aux_indices=(0,), mla_indices=(0, 0, 1, 1),
                mla_channels=8, mlahead_channels=4, aux_heads=True)
    with pytest.raises(ValueError, match="increasing"):
        setr(decoder="mla", **tiny)
    tiny["mla_indices"] = (0, 1, 2, 3)
    tiny["depth"] = 4
    x = images(1, (32, 48))
    shapes = {d: [tuple(o.shape) for o in setr(decoder=d, **tiny)(x)] for d in
              ("naive", "pup", "mla")}
    assert shapes["naive"] == [(1, 32, 48, 3)] * 2
    assert shapes["pup"] == [(1, 64, 96, 3), (1, 32, 48, 3)]
    assert shapes["mla"] == [(1, 32, 48, 3)] * 5


def test_invalid_arguments():
    tiny = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match="decoder must be one of"):
        setr(decoder="fpn", **tiny)
    with pytest.raises(ValueError, match="four blocks"):
        setr(decoder="mla", mla_indices=(0, 1), **tiny)
    with pytest.raises(ValueError, match="out of range for depth 2"):
        setr(decoder="pup", aux_indices=(5,), aux_heads=True, **tiny)
    with pytest.raises(ValueError, match="valid neighbours: 32 or 40"):
        setr(decoder="naive", **dict(tiny, img_size=36))


def test_align_corners_matrix():
    # F.interpolate(align_corners=True) of [0, 1] to 5 samples, and of 3 -> 4 (hand-computed).
    np.testing.assert_allclose(align_corners_matrix(2, 5) @ np.array([0.0, 1.0]),
                               [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(align_corners_matrix(3, 4) @ np.array([0.0, 3.0, 6.0]),
                               [0, 2, 4, 6])


@pytest.mark.parametrize("decoder", ["naive", "pup"])
def test_round_trip_and_tflite_of_the_other_decoders(decoder, tmp_path):
    """The contract's case is MLA (tests/families.py); naive and PUP with their auxiliary
    heads: safe-mode .keras round trip and builtin-only TFLite matching Keras."""
    entry = FIXTURES[f"{decoder}_32_aux"]
    model = build_from_fixture(entry)
    load_timm_weights(model, _state_dict(f"{decoder}_32_aux"))
    check_keras_round_trip(model, images(2, 32), tmp_path)
    check_tflite_fp32(model, tmp_path)
