"""Vision Transformer Pruning (keras_vit/compress/vtp.py): gated blocks checked against a
numpy reading of the formula, the L1 term, and pruning checked against the gated model whose
pruned gates are zero, then as an ordinary model (.keras, TFLite, a training step).

Tolerances: the gated model at init multiplies by gates of exactly 1 and otherwise computes
what the original does, so its logits agree to float32 rounding (atol 1e-6); the pruned
model sums fewer terms, with the gates folded into its weights (products rounded in a
different order), so logits of size ~0.1 agree to float32 rounding (atol 1e-5), as does the
block against its float64 numpy reading (atol 1e-5, outputs of size ~1); the L1 term is one
float32 sum of 320 gates (rtol 1e-5); an SGD step shrinks the gates' total size by the
penalty's 16.0 less the cross-entropy's share (measured ~0.005), so by 90% of 16 at least."""

import keras
import numpy as np
import pytest
from scipy.special import erf

import keras_vit
from keras_vit.compress import (GatedTransformerBlock, add_dimension_gates, dimension_gates,
                                prune_dimensions)
from keras_vit.models.common import count_parameters
from helpers import check_keras_round_trip, check_tflite_fp32, check_train_step_lowers_loss

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
BLOCKS = ("blocks.0", "blocks.1")


@pytest.fixture(scope="module")
def model():
    return keras_vit.create_model("deit_tiny_patch16_224", **SMALL)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")


def _np(tensor):
    return keras.ops.convert_to_numpy(tensor)


def _set_gates(gated, values):
    for name, kinds in values.items():
        block = gated.get_layer(name)
        block.attn_gates.assign(kinds["attn"])
        block.mlp_gates.assign(kinds["mlp"])


def _random_gates(rng, size):
    """Arbitrary gates away from 0, of both signs (pruning reads |g|)."""
    return rng.uniform(0.5, 1.5, size) * rng.choice([-1.0, 1.0], size)


def test_gated_model_starts_as_the_original_and_saves(model, x, tmp_path):
    gated = add_dimension_gates(model)
    assert all(isinstance(gated.get_layer(name), GatedTransformerBlock) for name in BLOCKS)
    gates = dimension_gates(gated)
    assert set(gates) == set(BLOCKS)
    assert all(np.all(g["attn"] == 1) and g["attn"].shape == (32,) and
               np.all(g["mlp"] == 1) and g["mlp"].shape == (128,) for g in gates.values())
    np.testing.assert_allclose(_np(gated(x)), _np(model(x)), atol=1e-6)  # gates of 1: x * 1.0
    # copied, not shared: training the gated model leaves the original as it was
    assert not {id(w) for w in gated.weights} & {id(w) for w in model.weights}
    check_keras_round_trip(gated, x, tmp_path)
    # vit_c (a convolutional stem with BatchNorm before the blocks) gates the same way
    vit_c = keras_vit.create_model("vit_c_1gf", stem_chs=(8, 8, 16, 16),
                                   **{k: v for k, v in SMALL.items() if k != "patch_size"})
    np.testing.assert_allclose(_np(add_dimension_gates(vit_c)(x)), _np(vit_c(x)), atol=1e-6)


def _layer_norm(x, gamma, beta, eps):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def test_gated_block_is_q_k_v_and_hidden_times_the_gates(model):
    gated = add_dimension_gates(model)
    rng = np.random.default_rng(2)
    _set_gates(gated, {"blocks.1": {"attn": _random_gates(rng, 32),
                                    "mlp": _random_gates(rng, 128)}})
    block = gated.get_layer("blocks.1")
    w = {v.path.split("/", 1)[1]: keras.ops.convert_to_numpy(v).astype("float64")
         for v in block.weights}
    tokens = rng.standard_normal((1, 17, 32)).astype("float32")
    # the direct reading: x + proj(attention of (q, k, v) * g_attn), then
    # x + fc2(gelu(fc1(LN(x))) * g_mlp), two heads of 16 dims, scores scaled by 1/sqrt(16)
    x = tokens.astype("float64")[0]
    h = _layer_norm(x, w["norm1/gamma"], w["norm1/beta"], 1e-6)
    q, k, v = np.split(h @ w["attn/qkv/kernel"] + w["attn/qkv/bias"], 3, axis=-1)
    q, k, v = q * w["attn_gates"], k * w["attn_gates"], v * w["attn_gates"]
    heads = []
    for s in (slice(0, 16), slice(16, 32)):
        logits = q[:, s] @ k[:, s].T / 4.0
        p = np.exp(logits - logits.max(-1, keepdims=True))
        heads.append(p / p.sum(-1, keepdims=True) @ v[:, s])
    x = x + np.concatenate(heads, -1) @ w["attn/proj/kernel"] + w["attn/proj/bias"]
    h = _layer_norm(x, w["norm2/gamma"], w["norm2/beta"], 1e-6) @ w["mlp/fc1/kernel"]
    h = h + w["mlp/fc1/bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2))) * w["mlp_gates"]
    x = x + h @ w["mlp/fc2/kernel"] + w["mlp/fc2/bias"]
    np.testing.assert_allclose(_np(block(tokens))[0], x, atol=1e-5)


def test_training_adds_the_l1_term_and_fit_shrinks_the_gates(model, x):
    gated = add_dimension_gates(model, l1=0.5)
    rng = np.random.default_rng(3)
    _set_gates(gated, {name: {"attn": _random_gates(rng, 32), "mlp": _random_gates(rng, 128)}
                       for name in BLOCKS})
    l1_of_gates = sum(np.abs(g).sum() for kinds in dimension_gates(gated).values()
                      for g in kinds.values())
    gated(x, training=True)
    np.testing.assert_allclose(sum(float(v) for v in gated.losses), 0.5 * l1_of_gates,
                               rtol=1e-5)
    gated(x, training=False)
    assert not gated.losses  # inference: no penalty
    # a plain fit step optimises cross-entropy + l1 * sum|g|: at l1 = 0.5 the penalty's
    # gradient (0.5 sign(g) per gate) dominates, so an SGD step of 0.1 takes about 0.05 off
    # each of the 320 gates' size (measured 16.00; the cross-entropy's share is ~0.005)
    gated.compile(optimizer=keras.optimizers.SGD(0.1), run_eagerly=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    gated.fit(x, np.array([0, 1]), epochs=1, verbose=0)
    after = sum(np.abs(g).sum() for kinds in dimension_gates(gated).values()
                for g in kinds.values())
    assert after < l1_of_gates - 0.9 * 0.05 * 320, (l1_of_gates, after)


def test_pruned_model_equals_the_gated_one_and_is_ordinary(model, x, tmp_path):
    gated = add_dimension_gates(model)
    rng = np.random.default_rng(4)
    values = {name: {"attn": _random_gates(rng, 32), "mlp": _random_gates(rng, 128)}
              for name in BLOCKS}
    values["blocks.0"]["attn"][[1, 7, 8, 16, 30, 31]] = 0  # 3 of each head's 16 dims
    values["blocks.0"]["mlp"][rng.permutation(128)[:100]] = 0
    values["blocks.1"]["attn"][[2, 3, 20, 21, 22, 23, 24, 25]] = 0  # 2 in head 0, 6 in head 1
    values["blocks.1"]["mlp"][:3] = 0
    _set_gates(gated, values)
    pruned, dims = prune_dimensions(gated, threshold=0)
    # blocks.1 keeps 14 + 10 dims: 12 in each head, head 0 its 12 largest |g|, head 1 its 10
    # nonzero and 2 zero gates
    assert dims == {"blocks.0": {"head_dim": 13, "mlp_hidden_dim": 28},
                    "blocks.1": {"head_dim": 12, "mlp_hidden_dim": 125}}
    for name, block_dims in dims.items():
        block = pruned.get_layer(name)
        assert type(block) is keras_vit.layers.blocks.TransformerBlock
        assert {k: block.get_config()[k] for k in block_dims} == block_dims
        n, m = block_dims["head_dim"], block_dims["mlp_hidden_dim"]
        assert tuple(block.attn.qkv.kernel.shape) == (32, 3 * 2 * n)
        assert tuple(block.attn.proj.kernel.shape) == (2 * n, 32)
        assert tuple(block.mlp.fc1.kernel.shape) == (32, m)
        assert tuple(block.mlp.fc2.kernel.shape) == (m, 32)
    assert count_parameters(pruned) < count_parameters(model)
    # the direct reading: the gated model with the pruned dims' gates 0 (blocks.1's head 0
    # also loses its 2 smallest nonzero gates, to keep 12 like head 1)
    head0 = np.abs(values["blocks.1"]["attn"][:16])
    values["blocks.1"]["attn"][np.argsort(head0, kind="stable")[2:4]] = 0
    _set_gates(gated, values)
    y = _np(pruned(x))
    assert not np.allclose(y, _np(model(x)), atol=1e-3)  # the gates matter: not the original
    np.testing.assert_allclose(y, _np(gated(x)), atol=1e-5)
    check_keras_round_trip(pruned, x, tmp_path)
    check_tflite_fp32(pruned, tmp_path)
    check_train_step_lowers_loss(pruned, x, np.array([0, 1]))


def test_fraction_ranks_each_kind_across_blocks_and_blocks_keep_one_dim():
    gated = add_dimension_gates(keras_vit.create_model("deit_tiny_patch16_224", **SMALL))
    rng = np.random.default_rng(5)
    attn, mlp = rng.permutation(64) + 1.0, rng.permutation(256) + 1.0  # distinct sizes
    _set_gates(gated, {name: {"attn": attn[32 * i:32 * (i + 1)], "mlp": mlp[128 * i:128 * (i + 1)]}
                       for i, name in enumerate(BLOCKS)})
    _, dims = prune_dimensions(gated, fraction=0.25)  # the 16 smallest of 64, 64 of 256
    for i, name in enumerate(BLOCKS):
        kept_attn = int(np.sum(attn[32 * i:32 * (i + 1)] > 16))
        kept_mlp = int(np.sum(mlp[128 * i:128 * (i + 1)] > 64))
        assert dims[name] == {"head_dim": int(np.floor(kept_attn / 2 + 0.5)),
                              "mlp_hidden_dim": kept_mlp}
    _, dims = prune_dimensions(gated, threshold=1e3)  # every gate below: the minimum stays
    assert dims == {name: {"head_dim": 1, "mlp_hidden_dim": 1} for name in BLOCKS}


def test_bad_arguments_say_what_was_expected(model):
    gated = add_dimension_gates(model)
    with pytest.raises(ValueError, match="exactly one of threshold"):
        prune_dimensions(gated)
    with pytest.raises(ValueError, match="exactly one of threshold"):
        prune_dimensions(gated, threshold=0.1, fraction=0.5)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        prune_dimensions(gated, fraction=1.0)
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        prune_dimensions(gated, threshold=-1)
    with pytest.raises(ValueError, match="no gated blocks.*add_dimension_gates"):
        prune_dimensions(model, fraction=0.5)
    with pytest.raises(ValueError, match="l1 must be a number >= 0"):
        add_dimension_gates(model, l1=-1.0)
    with pytest.raises(ValueError, match="no TransformerBlocks with multi-head attention"):
        add_dimension_gates(model, prefix="layers.")
