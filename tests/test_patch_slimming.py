"""Patch slimming (keras_vit/compress/patch_slimming.py): each block computes only its prefix
tokens and its most important patches, per image; checked against a numpy reading of the
paper's rule, then as an ordinary model (.keras, TFLite, a training step, fewer tokens).

Tolerances: keeping every patch leaves the original layers and graph, so the outputs agree
to float32 rounding (atol 1e-6; measured 0). The numpy reading and the slimmed model run the
same float32 layers on the same tokens, the slimmed block's attention rows being computed
for fewer queries (a different matmul shape) and the scores in float64 against float32, so
tokens of size ~1 and logits of size ~0.1 agree to rounding (atol 1e-5), and the kept
indices exactly (the test images give no near-ties). The schedule's error is measured with
the very computation the slimmed model runs, so the model meets the tolerance up to float32
rounding between eager calls and the functional graph (slack 1e-6 on a relative error)."""

import keras
import numpy as np
import pytest

import keras_vit
from helpers import check_keras_round_trip, check_tflite_fp32, check_train_step_lowers_loss
from keras_vit.compress import PatchSlimmedBlock, patch_slimming_schedule, slim_patches

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
PATCHES = 16  # (32 / 8)^2


def tiny(**kwargs):
    return keras_vit.create_model("deit_tiny_patch16_224", **dict(SMALL, **kwargs))


def sample(n=4, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 3)).astype("float32")


def block_tokens(model):
    """The number of tokens out of each block of ``model``, in order, as the model calls it
    (a block shared with another model has that model's output too)."""
    counts = []

    def record(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        if layer.name.startswith("blocks."):
            counts.append(out.shape[1])
        return out

    keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=record)
    return counts


def test_keeping_every_patch_is_the_original_model():
    model, x = tiny(), sample()
    slim = slim_patches(model, [PATCHES] * 3)
    assert not any(isinstance(layer, PatchSlimmedBlock) for layer in slim.layers)
    np.testing.assert_allclose(slim(x), model(x), atol=1e-6)  # same layers: float32 rounding
    # the last block's patches are read by nothing (the head takes [CLS]): dropping them all
    # changes no output, as the paper's last-layer mask (the class token alone) says
    last = slim_patches(model, [PATCHES, PATCHES, 0])
    assert block_tokens(last) == [17, 17, 1]
    np.testing.assert_allclose(last(x), model(x), atol=1e-6)  # the head reads [CLS] only


def numpy_layer_norm(layer, x):
    gamma, beta = (np.asarray(w, np.float64) for w in layer.get_weights())
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + layer.epsilon) * gamma + beta


def numpy_kept_patches(block, tokens, keep):
    """The paper's score read directly for one image's (N, D) tokens entering ``block``:
    patch i's term in the [CLS] head outputs, sum_h P_h[0, i]^2 ||v_h,i||^2; the indices
    (into the patches) of the ``keep`` largest, largest first."""
    attn = block.attn
    kernel, bias = (np.asarray(w, np.float64) for w in attn.qkv.get_weights())
    qkv = numpy_layer_norm(block.norm1, tokens.astype(np.float64)) @ kernel + bias
    heads, d = attn.num_heads, attn.head_dim
    q, k, v = (qkv[:, i * heads * d:(i + 1) * heads * d].reshape(-1, heads, d).transpose(1, 0, 2)
               for i in range(3))
    logits = np.einsum("hd,hnd->hn", q[:, 0], k) * d ** -0.5  # the [CLS] query's row
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    scores = np.sum(probs[:, 1:] ** 2 * np.sum(v[:, 1:] ** 2, -1), axis=0)
    return np.argsort(-scores, kind="stable")[:keep]


def test_slimmed_blocks_keep_the_patches_the_paper_scores_highest():
    model, x = tiny(), sample(1)
    keep = [12, 5, 0]
    slim = slim_patches(model, keep)
    # the direct reading: each original block on all its tokens, then only the prefix and
    # the kept patches' rows go on; the model's final norm and head on [CLS]
    tokens = np.asarray(keras.Model(model.input, model.get_layer("blocks.0").input)(x))[0]
    expected = []
    for i, count in enumerate(keep):
        block = model.get_layer(f"blocks.{i}")
        kept = numpy_kept_patches(block, tokens, count)
        full = np.asarray(block(tokens[None]))[0]
        tokens = full[np.concatenate([[0], kept + 1])]
        expected.append(tokens)
    logits = model.get_layer("head")(model.get_layer("norm")(tokens[None])[:, 0])
    outputs = keras.Model(slim.input, [slim.get_layer(f"blocks.{i}_slim").output
                                       for i in range(3)] + [slim.output])(x)
    for got, want in zip(outputs[:3], expected):
        np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-5)  # other matmul shapes
    np.testing.assert_allclose(outputs[3], logits, atol=1e-5)  # float32 vs float64 scores
    assert not np.allclose(outputs[3], model(x), atol=1e-4)  # something was dropped


def test_schedule_is_non_increasing_and_meets_its_tolerance():
    model, x = tiny(), sample(4)
    reference = np.asarray(model(x), np.float64)
    schedules = {}
    for tolerance in (0.02, 0.2):
        keep, error = patch_slimming_schedule(model, x, tolerance=tolerance, return_errors=True)
        schedules[tolerance] = keep
        assert len(keep) == 3 and all(a >= b for a, b in zip(keep, keep[1:]))
        assert keep[-1] == 0  # the last block's patches are free, as the paper's m_L
        assert error <= tolerance
        slimmed = np.asarray(slim_patches(model, keep)(x), np.float64)
        measured = np.linalg.norm(slimmed - reference) / np.linalg.norm(reference)
        np.testing.assert_allclose(measured, error, atol=1e-6)  # eager vs graph rounding
        assert measured <= tolerance + 1e-6
    assert sum(schedules[0.2]) < sum(schedules[0.02])  # a looser tolerance keeps fewer


def test_slimmed_model_is_ordinary_and_runs_fewer_tokens(tmp_path):
    model, x = tiny(), sample(2)
    slim = slim_patches(model, [10, 4])  # the last block keeps 4 as well
    assert block_tokens(model) == [17, 17, 17]
    assert block_tokens(slim) == [11, 5, 5]
    assert len(slim.weights) == len(model.weights)  # the same weights, nothing new
    assert all(a is b for a, b in zip(slim.weights, model.weights))
    check_keras_round_trip(slim, x, tmp_path)
    check_tflite_fp32(slim, tmp_path)
    check_train_step_lowers_loss(slim, x, np.array([0, 1]))


def test_bad_arguments_raise_before_any_work():
    model = tiny()
    with pytest.raises(ValueError, match="1..3 patch counts"):
        slim_patches(model, [16, 8, 4, 2])
    with pytest.raises(ValueError, match="non-increasing"):
        slim_patches(model, [8, 12, 0])
    with pytest.raises(ValueError, match=r"in 0..16"):
        slim_patches(model, [17])
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        patch_slimming_schedule(model, sample(1), tolerance=0)
    gap = tiny(class_token=False, global_pool="avg")
    for call in (lambda: slim_patches(gap, [8]), lambda: patch_slimming_schedule(gap, None)):
        with pytest.raises(ValueError, match=r"\[CLS\] prefix token read by the head"):
            call()
