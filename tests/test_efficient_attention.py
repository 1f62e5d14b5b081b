"""The efficient token mixers (keras_vit/layers/efficient_attention.py) against a direct,
loop-by-loop numpy reading of their formulas, as drop-in mixers of DeiT, through .keras and
builtin-only TFLite, at another input size, and one training step that lowers the loss.

Tolerances: the layers compute in float32 with fused matmuls, the readings sum term by term
in another order, so outputs of size ~1 agree to float32 rounding accumulated over a few
hundred products (atol 1e-5, rtol 1e-4); the Hamburger reading runs its NMF in float64,
and the layer's float32 multiplicative updates (products of ratios over 3 steps) compound
rounding to ~1e-4 relative (rtol 1e-3)."""

import os

import keras
import numpy as np
import pytest

import keras_vit
from helpers import check_builds_at, check_keras_round_trip, check_train_step_lowers_loss
from keras_vit.export import export_tflite
from keras_vit.layers.efficient_attention import (BigBirdAttention, HamburgerMixer,
                                                  LinearAttention, LongShortRangeAttention,
                                                  TopKAttention, bigbird_key_blocks)


def _qkv(layer, x):
    q, k, v = (keras.ops.convert_to_numpy(t) for t in layer.project_qkv(x))
    return q, k, v


def _finish(layer, heads_out):
    """(B, H, N, d) -> the layer's output through its own projection."""
    b, h, n, d = heads_out.shape
    merged = heads_out.transpose(0, 2, 1, 3).reshape(b, n, h * d)
    return keras.ops.convert_to_numpy(layer.proj(merged))


def _phi(x):
    return np.where(x > 0, x + 1.0, np.exp(x))  # elu(x) + 1


def linear_attention_direct(q, k, v, causal, eps=1e-6):
    """out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j), j over all keys (or
    j <= i): Katharopoulos et al.'s equation 2 with their feature map, one query at a time."""
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                last = i + 1 if causal else k.shape[2]
                sim = np.array([_phi(q[b, h, i]) @ _phi(k[b, h, j]) for j in range(last)])
                out[b, h, i] = (sim[:, None] * v[b, h, :last]).sum(0) / (sim.sum() + eps)
    return out


def topk_attention_direct(q, k, v, top, scale):
    """Softmax over each query's ``top`` largest scores, zero weight elsewhere."""
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                scores = (q[b, h, i] * scale) @ k[b, h].T
                kept = np.argsort(-scores)[:top]
                w = np.exp(scores[kept] - scores[kept].max())
                out[b, h, i] = (w / w.sum()) @ v[b, h, kept]
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_is_its_formula(causal):
    layer = LinearAttention(16, 2, causal=causal)
    x = np.random.default_rng(0).standard_normal((2, 7, 16)).astype("float32")
    out = keras.ops.convert_to_numpy(layer(x))
    expected = _finish(layer, linear_attention_direct(*_qkv(layer, x), causal))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("top", [1, 3, 7])
def test_topk_attention_is_its_formula(top):
    layer = TopKAttention(16, 2, k=top)
    x = np.random.default_rng(1).standard_normal((2, 7, 16)).astype("float32")
    out = keras.ops.convert_to_numpy(layer(x))
    expected = _finish(layer, topk_attention_direct(*_qkv(layer, x), top, layer.scale))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    if top == 7:  # every key kept: dense attention, the same weights
        dense = keras_vit.layers.MultiHeadAttention(16, 2)
        dense.build(x.shape)
        dense.set_weights(layer.get_weights())
        np.testing.assert_allclose(out, keras.ops.convert_to_numpy(dense(x)), atol=1e-5)


def bigbird_direct(q, k, v, scale, blocks, kept, block_size):
    """Dense softmax attention under BigBird's token mask, one query at a time: query token
    t (block t // b) sees key token s if s's block is one of its block's kept key blocks."""
    n = q.shape[2]
    out = np.zeros_like(q)
    for b_ in range(q.shape[0]):
        for h in range(q.shape[1]):
            for t in range(n):
                row = t // block_size
                allowed = {blk for blk, ok in zip(blocks[row], kept[row]) if ok}
                keys = [s for s in range(n) if s // block_size in allowed]
                scores = (q[b_, h, t] * scale) @ k[b_, h, keys].T
                w = np.exp(scores - scores.max())
                out[b_, h, t] = (w / w.sum()) @ v[b_, h, keys]
    return out


def test_bigbird_pattern_is_bigbirds():
    blocks, kept = bigbird_key_blocks(8, window=3, num_global=1, num_random=2, seed=0)
    assert list(blocks[0]) == list(range(8)) and kept[0].all()  # the global block: all
    for i in range(1, 8):
        row = [int(j) for j, ok in zip(blocks[i], kept[i]) if ok]
        assert len(row) == len(set(row))  # no key block twice
        assert {0, i} <= set(row) and {i - 1, min(i + 1, 7)} <= set(row)
        assert len(set(row) - {0, i - 1, i, i + 1}) == 2  # two random ones
    again, _ = bigbird_key_blocks(8, window=3, num_global=1, num_random=2, seed=0)
    np.testing.assert_array_equal(blocks, again)  # seeded: one pattern, every call


@pytest.mark.parametrize("length", [16, 13])  # whole blocks; padded to them
def test_bigbird_attention_is_its_formula(length):
    layer = BigBirdAttention(16, 2, block_size=2, window=3, num_global=1, num_random=1, seed=3)
    x = np.random.default_rng(4).standard_normal((2, length, 16)).astype("float32")
    out = keras.ops.convert_to_numpy(layer(x))
    blocks, kept, _ = layer.pattern(length)
    expected = _finish(layer, bigbird_direct(*_qkv(layer, x), layer.scale, blocks, kept, 2))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def _np(t):
    return keras.ops.convert_to_numpy(t)


def test_lsra_is_attention_on_half_and_a_lightweight_convolution_on_the_other():
    layer = LongShortRangeAttention(16, 2, kernel_size=3, conv_heads=2)
    x = np.random.default_rng(5).standard_normal((2, 6, 16)).astype("float32")
    out = _np(layer(x))
    # global half: the attention layer's own formula (tested above) on channels 0..7
    np.testing.assert_allclose(out[..., :8], _np(layer.attn(x[..., :8])), atol=1e-6)
    # local half, by hand: linear, GLU, per-group softmax taps summed over tokens t-1..t+1
    # (zero outside), linear
    w_in, b_in = (_np(w) for w in layer.conv_in.weights)
    w_out, b_out = (_np(w) for w in layer.conv_out.weights)
    h = x[..., 8:] @ w_in + b_in
    glu = h[..., :8] * (1 / (1 + np.exp(-h[..., 8:])))
    raw = _np(layer.conv_weight)
    taps = np.exp(raw) / np.exp(raw).sum(-1, keepdims=True)  # (groups, 3)
    conv = np.zeros_like(glu)
    for b in range(2):
        for t in range(6):
            for c in range(8):
                group = c // 4
                for j, offset in enumerate((-1, 0, 1)):
                    if 0 <= t + offset < 6:
                        conv[b, t, c] += taps[group, j] * glu[b, t + offset, c]
    np.testing.assert_allclose(out[..., 8:], conv @ w_out + b_out, rtol=1e-4, atol=1e-5)


def nmf_direct(x, bases, steps, eps=1e-6):
    """Lee-Seung multiplicative NMF of one matrix x (d, N) ~ D C^T, written out: C from
    softmax(x^T D) over the bases, then per step C <- C * x^T D / (C D^T D), D <- D * x C /
    (D C^T C), and a last C update."""
    d_ = bases.copy()
    scores = x.T @ d_
    c = np.exp(scores - scores.max(1, keepdims=True))
    c /= c.sum(1, keepdims=True)
    for _ in range(steps):
        c = c * (x.T @ d_) / (c @ (d_.T @ d_) + eps)
        d_ = d_ * (x @ c) / (d_ @ (c.T @ c) + eps)
    c = c * (x.T @ d_) / (c @ (d_.T @ d_) + eps)
    return d_ @ c.T


def test_hamburger_is_lower_bread_nmf_upper_bread():
    layer = HamburgerMixer(16, rank=4, steps=3)
    x = np.random.default_rng(6).standard_normal((2, 7, 16)).astype("float32")
    out = _np(layer(x))
    bases = _np(layer.bases)
    assert (bases >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(bases, axis=0), 1.0, rtol=1e-5)  # unit columns
    w_lo, b_lo = (_np(w) for w in layer.lower.weights)
    w_up, b_up = (_np(w) for w in layer.upper.weights)
    expected = np.zeros_like(out)
    for b in range(2):
        h = np.maximum(x[b] @ w_lo + b_lo, 0.0)  # (N, d), non-negative
        expected[b] = nmf_direct(h.T.astype("float64"), bases.astype("float64"), 3).T @ w_up \
            + b_up
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-5)


def test_linear_attention_refuses_masks():
    layer = LinearAttention(8, 2)
    x = np.zeros((1, 3, 8), "float32")
    with pytest.raises(ValueError, match="no attention mask"):
        layer(x, attention_mask=np.ones((1, 1, 3, 3), bool))


def test_unknown_attention_is_named():
    with pytest.raises(ValueError, match="attention must be one of"):
        keras_vit.create_model("deit_tiny_patch16_224", attention="sparse", depth=1)


MIXERS = [("linear", None), ("topk", {"k": 8}), ("bigbird", {"block_size": 2, "num_random": 1}),
          ("lsra", {"kernel_size": 3}), ("hamburger", {"rank": 8, "steps": 3})]
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


@pytest.mark.parametrize("kind,args", MIXERS)
def test_deit_with_efficient_attention_round_trips(tmp_path, kind, args):
    model = keras_vit.create_model("deit_small_patch16_224", attention=kind,
                                   attention_args=args, **SMALL)
    dense = keras_vit.create_model("deit_small_patch16_224", **SMALL)
    if kind not in ("lsra", "hamburger"):  # their weights are their own
        assert [w.path for w in model.weights] == [w.path for w in dense.weights]
        model.set_weights(dense.get_weights())  # a dense checkpoint is a valid start
    x = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    y = keras.ops.convert_to_numpy(model(x))
    y_dense = keras.ops.convert_to_numpy(dense(x))
    assert np.abs(y - y_dense).max() > 1e-3 * np.abs(y_dense).max()  # another mixer indeed
    check_keras_round_trip(model, x, tmp_path)  # bit for bit
    check_builds_at(lambda **kw: keras_vit.create_model(
        "deit_small_patch16_224", attention=kind, attention_args=args, **kw), SMALL, 48)
    check_train_step_lowers_loss(model, x, np.array([0, 1]))


def test_every_mixer_exports_to_builtin_tflite(tmp_path):
    """One file holding a block of each kind (one conversion instead of four)."""
    tokens = keras.Input((18, 32))
    h = tokens
    for i, (kind, args) in enumerate(MIXERS):
        h = keras_vit.layers.TransformerBlock(32, 2, attention=kind, attention_args=args,
                                              name=f"blocks.{i}")(h)
    model = keras.Model(tokens, h)
    x = np.random.default_rng(3).standard_normal((1, 18, 32)).astype("float32")
    report = export_tflite(model, os.path.join(tmp_path, "mixers.tflite"),
                           representative_data=x)
    assert report["max_abs_diff"] < 1e-4, report  # fp32 file: the contract's 1e-4
