import numpy as np
import pytest

import keras_vit
from conftest import fixture_path, images, load_fixture_index, load_param_counts
from helpers import (
    build_from_fixture,
    check_builds_at,
    check_param_count_equals_timm,
    check_timm_parity,
    check_variant,
)
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.convert.swin import original_to_timm, resize_relative_position_bias_table
from keras_vit.layers.window import (
    cyclic_shift,
    relative_position_index,
    shifted_window_mask,
    swin_window_and_shift,
    window_partition,
    window_reverse,
)
from keras_vit.models.swin import swin_transformer
from keras_vit.registry import IMAGENET_MEAN

SWIN_FIXTURES = load_fixture_index("swin")
TINY = dict(img_size=32, patch_size=4, embed_dim=24, depths=(2, 2), num_heads=(1, 2),
            window_size=4, num_classes=5)


@pytest.mark.parametrize("name", sorted(SWIN_FIXTURES))
def test_timm_parity(name):
    check_timm_parity("swin", name, SWIN_FIXTURES[name])


@pytest.mark.parametrize("name", sorted(load_param_counts("swin")))
def test_full_size_parameter_count_equals_timm(name):
    check_param_count_equals_timm("swin", name, interpolation="bicubic", mean=IMAGENET_MEAN,
                                  crop_pct=1.0 if name.endswith("384") else 0.9)


def test_every_registered_swin_has_a_timm_count():
    swin = [n for n in keras_vit.list_models("swin*")  # not swin_unet (segmentation)
            if keras_vit.get_model_config(n)["family"] == "swin"]
    assert sorted(load_param_counts("swin")) == swin


def test_padded_windows_round_trip_and_convert_at_most_4d(tmp_path):
    # 36 px: shifted windows in both stages, the 9x9 and 5x5 stages padded to the window, the
    # 9x9 map padded before patch merging (32 px, unpadded, is test_contract.py's swin case).
    report = check_variant(swin_transformer(**dict(TINY, img_size=36)), images(4, 36), tmp_path)
    _assert_tflite_at_most_4d(report["path"])


def _assert_tflite_at_most_4d(path):
    from ai_edge_litert.interpreter import Interpreter

    ranks = {d["name"]: len(d["shape"]) for d in Interpreter(model_path=path).get_tensor_details()}
    assert max(ranks.values()) <= 4, {k: r for k, r in ranks.items() if r > 4}


@pytest.mark.parametrize("size", [32, 24, (24, 36), 20, 4])
def test_any_valid_size(size):
    check_builds_at(swin_transformer, TINY, size)  # 4 and 20 px: windows padded, clipped


def test_window_clipped_to_small_stage():
    model = swin_transformer(**dict(TINY, img_size=(24, 36)))  # stage 1 is 3x5
    block = model.get_layer("layers.1.blocks.1")
    assert block.window_size == (3, 4) and block.shift_size == (0, 2)
    assert tuple(block.attn.relative_position_bias_table.shape) == (5 * 7, 2)


def test_invalid_size_names_valid_neighbours():
    with pytest.raises(ValueError, match=r"not a multiple of patch_size 4; valid neighbours: "
                                         r"224 or 228"):
        keras_vit.create_model("swin_tiny_patch4_window7_224", img_size=226)


def test_features_only_stage_maps_at_strides_4_to_32():
    kwargs = dict(TINY, img_size=64, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                  features_only=True)
    feats = swin_transformer(**kwargs)(images(2, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 24), (2, 8, 8, 48), (2, 4, 4, 96),
                                               (2, 2, 2, 192)]
    last = swin_transformer(**dict(kwargs, out_indices=2))(images(2, 64))
    assert [tuple(f.shape) for f in last] == [(2, 4, 4, 96), (2, 2, 2, 192)]
    with pytest.raises(ValueError, match="out index 4"):
        swin_transformer(**dict(kwargs, out_indices=(0, 4)))


def test_create_model_loads_pretrained_path():
    entry = SWIN_FIXTURES["swin_24_from_32"]
    data = np.load(fixture_path("swin", "swin_24_from_32.npz"))
    kwargs = {k: v for k, v in entry["kwargs"].items()}
    model = keras_vit.create_model("swin_tiny_patch4_window7_224",
                                   pretrained=fixture_path("swin", entry["weights"]), **kwargs)
    np.testing.assert_allclose(np.asarray(model(data["x"])), data["y0"], atol=1e-4)


def test_original_checkpoint_layout_loads():
    """The Microsoft layout (merging at a stage's end, plain head, buffers) through
    original_to_timm gives the timm fixture's output."""
    entry = SWIN_FIXTURES["swin_32"]
    sd = {}
    for k, v in load_checkpoint(fixture_path("swin", entry["weights"])).items():
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample", f"layers.{i - 1}.downsample")
        sd[k.replace("head.fc.", "head.")] = v
    sd["layers.0.blocks.0.attn.relative_position_index"] = relative_position_index(4)
    assert "layers.0.downsample.reduction.weight" in sd
    model = build_from_fixture(entry)
    load_timm_weights(model, original_to_timm({"model": sd}))
    data = np.load(fixture_path("swin", "swin_32.npz"))
    np.testing.assert_allclose(np.asarray(model(data["x"])), data["y0"], atol=1e-4)


def test_features_only_loads_checkpoint_with_head():
    entry = SWIN_FIXTURES["swin_32"]
    sd = load_checkpoint(fixture_path("swin", entry["weights"]))
    model = swin_transformer(**dict(entry["kwargs"], features_only=True, out_indices=(0, 1)))
    assert load_timm_weights(model, sd) == ([], [])
    # Stages after the last output are not in the model: their keys are the cut-off tail,
    # so the full checkpoint still loads strictly.
    model = swin_transformer(**dict(entry["kwargs"], features_only=True, out_indices=(0,)))
    assert load_timm_weights(model, sd) == ([], [])
    assert not any(layer.name.startswith("layers.1") for layer in model.layers)


def test_bias_table_resize_keeps_same_window_and_checks_shapes():
    table = np.random.default_rng(0).standard_normal((49, 3)).astype(np.float32)
    np.testing.assert_array_equal(resize_relative_position_bias_table(table, 4), table)
    assert resize_relative_position_bias_table(table, 7).shape == (169, 3)
    # Downsizing to one position keeps the centre (zero offset) entry.
    np.testing.assert_allclose(resize_relative_position_bias_table(table, 1), table[24:25],
                               atol=1e-6)
    with pytest.raises(ValueError, match="cannot infer the window"):
        resize_relative_position_bias_table(table[:48], 3)


def test_cyclic_shift_is_roll_and_windows_round_trip():
    x = images(2, (8, 12), chans=5)
    np.testing.assert_array_equal(np.asarray(cyclic_shift(x, (-2, -3))),
                                  np.roll(x, (-2, -3), axis=(1, 2)))
    np.testing.assert_array_equal(np.asarray(cyclic_shift(x, (2, 0))), np.roll(x, 2, axis=1))
    win = np.asarray(window_partition(x, (4, 6)))
    # timm's 6-D partition, in numpy.
    ref = x.reshape(2, 2, 4, 2, 6, 5).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 24, 5)
    np.testing.assert_array_equal(win, ref)
    np.testing.assert_array_equal(np.asarray(window_reverse(win, (4, 6), 8, 12)), x)


def test_window_clipping_and_mask_follow_timm():
    assert swin_window_and_shift((8, 8), 4, shifted=True) == ((4, 4), (2, 2))
    assert swin_window_and_shift((4, 9), 4, shifted=True) == ((4, 4), (0, 2))
    assert swin_window_and_shift((3, 3), 7, shifted=True) == ((3, 3), (0, 0))
    assert shifted_window_mask((8, 8), 4, (0, 0)) is None
    mask = shifted_window_mask((8, 8), 4, (2, 2))
    assert mask.shape == (4, 16, 16)
    assert not mask[0].any() and set(np.unique(mask[3])) == {0.0, -100.0}
    idx = relative_position_index((2, 3))
    assert idx.shape == (6, 6) and idx.max() == 3 * 5 - 1 and idx[0, 0] == idx[5, 5] == 7
