import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import keras_vit
from conftest import fixture_path, images, load_fixture_index
from helpers import build_from_fixture, check_timm_parity, create_model_without_weights
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.convert.swin_unet import swin_encoder_init
from keras_vit.models.common import count_parameters
from keras_vit.segmentation.swin_unet import depth_to_space, swin_unet, window_and_shift

FIXTURES = load_fixture_index("swin_unet")
INIT = "swin_unet_32_imagenet_init"  # needs swin_encoder_init after the weights


def _official_counts():
    with open(fixture_path("swin_unet", "official_param_counts.json")) as f:
        return json.load(f)


def _state_dict(name):
    return dict(load_checkpoint(fixture_path("swin_unet", FIXTURES[name]["weights"])))


def _max_diff(model, name):
    data = np.load(fixture_path("swin_unet", f"{name}.npz"))
    return float(np.max(np.abs(np.asarray(model(data["x"], training=False)) - data["y0"])))


@pytest.mark.parametrize("name", sorted(set(FIXTURES) - {INIT}))
def test_official_parity(name):
    # swin_unet_32: SwinTransformerSys keys at 32 px; swin_unet_wrapped_64: the SwinUnet
    # wrapper's (swin_unet.*) at 64 px, another config.
    model = check_timm_parity("swin_unet", name, FIXTURES[name])
    assert model.output_shape[1:3] == model.input_shape[1:3]  # logits at the input size


def test_imagenet_swin_init_as_the_official_load_from():
    entry = FIXTURES[INIT]
    model = build_from_fixture(entry)
    load_timm_weights(model, _state_dict(INIT))
    donor = load_checkpoint(fixture_path("swin_unet", entry["init_from"]))
    loaded, kept = swin_encoder_init(model, {"model": donor})
    assert _max_diff(model, INIT) <= 1e-4
    # Encoder and mirrored decoder blocks load; tables made for the donor's 64 px windows
    # (stages 2, 3 and the decoder stage mirroring 2), the decoder's own modules do not.
    assert "layers_up.3.blocks.1.attn.qkv.weight" in loaded and "norm.weight" in loaded
    assert "layers.3.blocks.1.attn.relative_position_bias_table" in kept
    assert "layers_up.1.blocks.0.attn.relative_position_bias_table" in kept
    assert "layers_up.3.blocks.0.attn.relative_position_bias_table" in loaded
    assert {k for k in kept if "relative_position" not in k} == {
        "layers_up.0.expand.weight", "layers_up.0.norm.weight", "layers_up.0.norm.bias",
        "concat_back_dim.1.weight", "concat_back_dim.1.bias", "concat_back_dim.2.weight",
        "concat_back_dim.2.bias", "concat_back_dim.3.weight", "concat_back_dim.3.bias",
        "layers_up.1.upsample.expand.weight", "layers_up.1.upsample.norm.weight",
        "layers_up.1.upsample.norm.bias", "layers_up.2.upsample.expand.weight",
        "layers_up.2.upsample.norm.weight", "layers_up.2.upsample.norm.bias", "norm_up.weight",
        "norm_up.bias", "up.expand.weight", "up.norm.weight", "up.norm.bias", "output.weight"}


def test_full_size_parameter_count_equals_official():
    ref = _official_counts()["swin_unet_tiny_224"]
    model = create_model_without_weights("swin_unet_tiny_224")
    assert count_parameters(model) == ref["params"] == 27_168_900  # the 27.17 M
    assert model.input_shape == (None, 224, 224, 3)
    assert model.output_shape == (None, 224, 224, ref["num_classes"])
    cfg = keras_vit.get_model_config("swin_unet_tiny_224")
    assert (cfg["task"], cfg["input_size"], cfg["num_classes"]) == ("segmentation", 224, 9)
    # The lite config's blocks and heads: 2 blocks per encoder and decoder stage.
    assert sum(layer.name.startswith(("layers.", "layers_up.")) and ".blocks." in layer.name
               for layer in model.layers) == 2 * 4 + 2 * 3


def test_every_registered_swin_unet_has_an_official_count():
    assert keras_vit.list_models("swin_unet*") == sorted(_official_counts())


@pytest.mark.parametrize("prefix", ["module.swin_unet.", ""])
def test_pretrained_path_loads_either_naming_strictly(prefix, tmp_path):
    """create_model(pretrained=PATH): the wrapper under DataParallel, and the bare model."""
    name = "swin_unet_wrapped_64"
    sd = {prefix + k[len("swin_unet."):]: v for k, v in _state_dict(name).items()}
    path = str(tmp_path / "ckpt.safetensors")
    save_file(sd, path)
    model = keras_vit.create_model("swin_unet_tiny_224", pretrained=path,
                                   **FIXTURES[name]["kwargs"])
    assert _max_diff(model, name) <= 1e-4


def test_missing_and_unexpected_keys_are_listed():
    # A registered name: load_timm_weights takes an unregistered model whose outputs are all
    # maps for a features_only cut and skips keys of modules it lacks (keras_vit.convert.core).
    model = keras_vit.create_model("swin_unet_tiny_224",
                                   **FIXTURES["swin_unet_wrapped_64"]["kwargs"])
    sd = _state_dict("swin_unet_wrapped_64")
    del sd["swin_unet.concat_back_dim.2.bias"]
    sd["swin_unet.layers_up.0.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"(?s)missing keys:\n  concat_back_dim\.2\.bias.*"
                                         r"unexpected keys:\n  layers_up\.0\.bias"):
        load_timm_weights(model, sd)


def test_depth_to_space_is_the_official_rearrange():
    # einops 'b h w (p1 p2 c) -> b (h p1) (w p2) c'
    x = images(2, (3, 5), chans=4 * 4 * 3)
    b, h, w, _ = x.shape
    ref = x.reshape(b, h, w, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 4 * h, 4 * w, 3)
    np.testing.assert_array_equal(np.asarray(depth_to_space(x, 4)), ref)


def test_window_rule_is_the_official_blocks():
    assert window_and_shift((8, 8), 4, shifted=True) == ((4, 4), (2, 2))
    assert window_and_shift((8, 8), 4, shifted=False) == ((4, 4), (0, 0))
    # A window not smaller than the map: the map's size, never shifted.
    assert window_and_shift((4, 4), 4, shifted=True) == ((4, 4), (0, 0))
    assert window_and_shift((2, 2), 7, shifted=True) == ((2, 2), (0, 0))
    # Non-square (beyond the official code): the shorter side decides.
    assert window_and_shift((8, 2), 4, shifted=True) == ((2, 2), (0, 0))


def test_invalid_size_and_config_errors():
    with pytest.raises(ValueError, match=r"size divisor \(patch 4 x 2\^3\) 32; valid "
                                         r"neighbours: 224 or 256"):
        keras_vit.create_model("swin_unet_tiny_224", img_size=230)
    with pytest.raises(ValueError, match="num_heads"):
        swin_unet(img_size=32, embed_dim=8, depths=(2, 2), num_heads=(1, 2, 2))
    with pytest.raises(ValueError, match="at least two stages"):
        swin_unet(img_size=32, embed_dim=8, depths=(2,), num_heads=(1,))


def test_size_padded_to_the_window_and_three_stages():
    """Beyond the official code: a 96 px map of 6 x 6 tokens in stage 2 padded to the
    window 4 (timm's rule), and three stages (the official indexes four)."""
    kw = dict(embed_dim=8, num_heads=(1, 2, 2, 4), window_size=4, num_classes=3)
    out = swin_unet(img_size=96, depths=(2, 2, 2, 2), **kw)(images(1, 96))
    assert out.shape == (1, 96, 96, 3) and np.isfinite(np.asarray(out)).all()
    model = swin_unet(img_size=(32, 48), depths=(2, 2, 2), **dict(kw, num_heads=(1, 2, 2)))
    assert model.get_layer("layers_up.2.blocks.1").input.shape == (None, 8, 12, 8)
    assert model(images(1, (32, 48))).shape == (1, 32, 48, 3)
