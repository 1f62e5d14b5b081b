import numpy as np
import pytest

import keras_vit
from conftest import fixture_path, images, load_fixture_index, load_param_counts
from helpers import (
    check_builds_at,
    check_keras_round_trip,
    check_timm_parity,
    create_model_without_weights,
)
from keras_vit.convert import load_checkpoint, load_timm_weights
from keras_vit.models.resnet import FrozenBatchNorm, resnet

FIXTURES = load_fixture_index("resnet")
TINY = dict(FIXTURES["resnet_tiny_64"]["kwargs"])


def trainable_params(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_timm_parity(name):
    check_timm_parity("resnet", name, FIXTURES[name])


@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
def test_parameter_count_equals_timm(name):
    ref = load_param_counts("resnet")[name]  # 25,557,032 and 44,549,160
    model = create_model_without_weights(name)
    assert trainable_params(model) == ref["params"]
    assert model.output_shape[-1] == ref["num_classes"]
    # torchvision / timm names, identical in both.
    for layer in ("conv1", "bn1", "layer1.0.conv1", "layer1.0.downsample.0",
                  "layer1.0.downsample.1", "layer4.2.conv3", "fc"):
        model.get_layer(layer)


def test_frozen_batch_norm_equals_batch_norm_inference_and_stays_fixed():
    """FrozenBatchNorm gives the checkpoint's BatchNorm inference output, in training too,
    has no trainable weights even after ``model.trainable = True``, and loads the same keys."""
    entry = FIXTURES["resnet_tiny_64"]
    weights = load_checkpoint(fixture_path("resnet", entry["weights"]))
    frozen = resnet(**dict(TINY, frozen_batch_norm=True))
    load_timm_weights(frozen, weights)
    data = np.load(fixture_path("resnet", "resnet_tiny_64.npz"))
    for training in (False, True):
        np.testing.assert_allclose(np.asarray(frozen(data["x"], training=training)),
                                   data["y0"], atol=1e-4)
    frozen.trainable = True
    bns = [l for l in frozen.layers if isinstance(l, FrozenBatchNorm)]
    assert len(bns) == 1 + 3 * 5 + 4  # stem, 3 per bottleneck (5 blocks), 4 downsamples
    trainable = {id(w) for w in frozen.trainable_weights}
    assert trainable and not any(id(w) in trainable for bn in bns for w in bn.weights)
    before = [np.asarray(w) for w in bns[0].weights]
    frozen(data["x"], training=True)
    for a, w in zip(before, bns[0].weights):
        np.testing.assert_array_equal(a, np.asarray(w))


def test_features_only_stage_maps_and_dilation():
    feats = resnet(**dict(TINY, features_only=True, out_indices=(1, 2, 3)))
    assert [tuple(o.shape[1:]) for o in feats.outputs] == [(8, 8, 64), (4, 4, 96), (2, 2, 128)]
    # layer4 is never built when not asked for.
    c4 = resnet(**dict(TINY, features_only=True, out_indices=(2,)))
    assert "layer4.0.conv1" not in [l.name for l in c4.layers]
    dc5 = resnet(**dict(TINY, features_only=True, out_indices=(-1,),
                        replace_stride_with_dilation=(False, False, True)))
    assert tuple(dc5.output_shape[1:]) == (4, 4, 128)
    # torchvision: the dilated stage's first block keeps dilation 1, the others dilate by 2.
    assert dc5.get_layer("layer4.0.conv2").dilation_rate == (1, 1)
    assert dc5.get_layer("layer3.0.conv2").strides == (2, 2)
    with pytest.raises(ValueError, match="network stride 16; valid neighbours: 48 or 64"):
        resnet(**dict(TINY, img_size=56, replace_stride_with_dilation=(False, False, True)))


def test_round_trip_and_any_valid_size(tmp_path):
    model = resnet(**dict(TINY, frozen_batch_norm=True))
    check_keras_round_trip(model, images(2, 64), tmp_path)
    check_builds_at(resnet, TINY, (64, 96))


def test_invalid_size_names_valid_neighbours():
    with pytest.raises(ValueError, match=r"network stride 32; valid neighbours: 224 or 256"):
        keras_vit.create_model("resnet50", img_size=230)
    with pytest.raises(ValueError, match="block must be"):
        resnet(block="wide", layers=(1, 1, 1, 1))


def test_stem_max_pool_pads_like_torch_and_quantizes(tmp_path):
    """MaxPool2d(3, 2, padding=1): the padding never wins (negative inputs too: botnet50ts'
    SiLU stem), and it pads with the input's minimum, not -inf: -inf became the calibrated
    range of an int8 file (a 1e33 bias scale after the pool; XNNPACK refused the file).
    The int8 ResNet now runs under LiteRT's default delegate and keeps its features."""
    import keras

    from keras_vit.export import export_tflite
    from keras_vit.models.botnet import MaxPool3x3S2

    x = np.random.default_rng(0).standard_normal((2, 9, 8, 3)).astype(np.float32) - 3.0
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    expected = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max((1, 2))
                                   for j in range(4)], 1) for i in range(5)], 1)
    np.testing.assert_array_equal(np.asarray(MaxPool3x3S2()(x)), expected)

    keras.utils.set_random_seed(0)
    model = resnet(**dict(TINY, num_classes=0), features_only=True, out_indices=(3,))
    report = export_tflite(model, str(tmp_path / "r.tflite"), "int8",
                           representative_data=images(16, TINY["img_size"], seed=1))
    assert report["relative_diff"] <= 0.3  # MAX_QUANTIZED_RELATIVE_DIFF["int8"]


def test_frozen_batch_norm_is_one_fused_op_with_the_convolution():
    """DETR's FrozenBatchNorm runs as the fused inference batch norm (layers.BatchNorm's):
    its formula's outputs and input gradients within 1e-5 (float32 round-off on values of
    scale ~5-20), and after grappler conv + norm + ReLU is one oneDNN convolution (DETR-R50
    at 512 px +6% images/s, benchmarks/README.md)."""
    import keras
    import tensorflow as tf

    from keras_vit.layers.common import unfused_norms
    from test_layers import grappler_optimized_ops

    rng = np.random.default_rng(4)
    norm = FrozenBatchNorm()
    norm.build((None, 6, 6, 8))
    norm.set_weights([rng.standard_normal(8).astype(np.float32),  # weight, bias, mean
                      rng.standard_normal(8).astype(np.float32),
                      rng.standard_normal(8).astype(np.float32),
                      rng.uniform(0.5, 2.0, 8).astype(np.float32)])  # running_var
    x = tf.constant((rng.standard_normal((2, 6, 6, 8)) * 2).astype(np.float32))

    def out_and_grad():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = norm(x)
            loss = tf.reduce_sum(y ** 2)
        return np.asarray(y), np.asarray(tape.gradient(loss, x))

    fused = out_and_grad()
    with unfused_norms():
        formula = out_and_grad()
    for a, b in zip(fused, formula):
        # outputs up to ~9 and gradients up to ~30, measured 9.5e-7 / 3.8e-6 apart: the
        # fused kernel's float32 evaluation order, nothing a wrong formula would stay within
        np.testing.assert_allclose(a, b, atol=1e-5)
    conv = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)
    conv.build((None, 6, 6, 8))
    ops = grappler_optimized_ops(lambda t: tf.nn.relu(norm(conv(t))),
                                 tf.TensorSpec((2, 6, 6, 8)), freeze=False)
    assert ("_FusedConv2D", ["FusedBatchNorm", "Relu"]) in ops, ops
