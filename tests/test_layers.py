import keras
import numpy as np
import pytest

from keras_vit import layers as L
from keras_vit.layers.blocks import causal_mask


def numpy_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads, bias=None, mask=None):
    b, n, d = x.shape
    qkv = x @ qkv_w + qkv_b
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, n, heads, -1).transpose(0, 2, 1, 3)
               for i in range(3))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = np.where(mask, logits, -1e9)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    return (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d) @ proj_w + proj_b


def test_attention_matches_formula_with_bias_and_mask():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    layer = L.MultiHeadAttention(12, num_heads=3)
    layer(x)
    qkv_w, qkv_b = (np.asarray(w) for w in layer.qkv.weights)
    proj_w, proj_b = (np.asarray(w) for w in layer.proj.weights)
    bias = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    mask = np.tril(np.ones((5, 5), bool))[None, None]
    got = layer(x, bias=bias, attention_mask=mask)
    want = numpy_attention(x, qkv_w, qkv_b, proj_w, proj_b, 3, bias=bias, mask=mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_cross_attention_takes_keys_and_values_from_context():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 8)).astype(np.float32)
    layer = L.MultiHeadAttention(8, num_heads=2, cross=True)
    out = np.asarray(layer(x, context=ctx))
    assert out.shape == (2, 3, 8)
    # Permuting the context positions leaves cross-attention unchanged (no positions inside).
    out_perm = np.asarray(layer(x, context=ctx[:, ::-1]))
    np.testing.assert_allclose(out, out_perm, atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        layer(x)


def test_sinusoid_table_is_the_survey_formula():
    table = L.sinusoid_table(50, 16)
    pos, i = 17, 3
    assert table[pos, 2 * i] == pytest.approx(np.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert table[pos, 2 * i + 1] == pytest.approx(np.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    layer = L.SinusoidalPositionEmbedding()
    x = np.zeros((1, 50, 16), np.float32)
    np.testing.assert_allclose(np.asarray(layer(x))[0], table, atol=1e-6)
    # The in-graph table for variable-length sequences is the same table.
    dyn = L.SinusoidalPositionEmbedding._dynamic_table(50, 16, "float32")
    np.testing.assert_allclose(np.asarray(dyn)[0], table, atol=1e-4)


def test_2d_sinusoid_encodes_rows_then_columns():
    t = L.sinusoid_table_2d((3, 4), 8)
    assert t.shape == (12, 8)
    row1 = L.sinusoid_table(3, 4)[1]
    col2 = L.sinusoid_table(4, 4)[2]
    np.testing.assert_allclose(t[1 * 4 + 2], np.concatenate([row1, col2]))


def test_drop_path_drops_whole_samples_and_keeps_expectation():
    layer = L.DropPath(0.25, seed=1)
    x = np.ones((4000, 3, 2), np.float32)
    y = np.asarray(layer(x, training=True))
    per_sample = y.reshape(4000, -1)
    assert np.all(np.isclose(per_sample, 0.0) | np.isclose(per_sample, 1 / 0.75))
    assert np.all(per_sample.min(1) == per_sample.max(1))  # all-or-nothing per sample
    assert abs(y.mean() - 1.0) < 0.05
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)


def test_pre_ln_and_post_ln_blocks_differ_as_defined():
    x = np.random.default_rng(2).standard_normal((2, 4, 8)).astype(np.float32)
    post = L.TransformerBlock(8, 2, norm_first=False)
    y = np.asarray(post(x))
    # Post-LN output is a LayerNorm output: zero mean, unit variance per token.
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)
    pre = L.TransformerBlock(8, 2, norm_first=True)
    assert abs(np.asarray(pre(x)).mean(-1)).max() > 1e-3  # Pre-LN keeps the residual stream


def test_causal_mask_hides_the_future():
    m = np.asarray(causal_mask(4))[0, 0]
    np.testing.assert_array_equal(m, np.tril(np.ones((4, 4), bool)))


@pytest.mark.parametrize("layer,inputs", [
    (L.PatchEmbed(4, 16, stride=2, padding=1, norm=True), (2, 16, 16, 3)),
    (L.PrefixTokens(("cls_token", "det_token"), counts=(1, 5)), (2, 9, 16)),
    (L.PositionEmbedding((3, 3), 1), (2, 10, 16)),
    (L.MapPositionEmbedding((3, 4)), (2, 3, 4, 16)),
    (L.SinusoidalPositionEmbedding((3, 3), 1), (2, 10, 16)),
    (L.TransformerBlock(16, 2, init_values=1e-5, drop_path=0.1), (2, 10, 16)),
    (L.TokenPool("avg", 1), (2, 10, 16)),
    (L.Mlp(32, act="gelu"), (2, 10, 16)),
])
def test_layers_serialise_completely(layer, inputs):
    x = np.random.default_rng(0).standard_normal(inputs).astype(np.float32)
    y = np.asarray(layer(x))
    clone = layer.__class__.from_config(layer.get_config())
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(clone(x)), y, atol=1e-6)
    assert keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))


def test_patch_embed_overlapping_grid():
    pe = L.PatchEmbed(7, 8, stride=4, padding=3)
    assert pe.grid_size(224, 224) == (56, 56)
    assert np.asarray(pe(np.zeros((1, 64, 48, 3), np.float32))).shape == (1, 16 * 12, 8)


def test_resize_grid_identity_and_constant():
    g = np.random.default_rng(0).standard_normal((5, 5, 3))
    np.testing.assert_allclose(L.resize_grid(g, (5, 5)), g, atol=1e-12)
    const = np.ones((4, 4, 2))
    for method in ("bicubic", "bilinear"):
        for aa in (True, False):
            np.testing.assert_allclose(L.resize_grid(const, (7, 3), method, aa), 1.0, atol=1e-9)


def test_layers_of_the_same_shape_start_different():
    """Each dense layer draws its own initial weights (a shared unseeded Keras initializer
    would give every block identical ones)."""
    from keras_vit.models.vit import vision_transformer

    model = vision_transformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                               num_classes=4)
    a = np.asarray(model.get_layer("blocks.0").attn.qkv.kernel)
    b = np.asarray(model.get_layer("blocks.1").attn.qkv.kernel)
    assert not np.allclose(a, b)
    assert 0.01 < a.std() < 0.03


@pytest.mark.parametrize("shape", [(6, 8), (2, 3, 8), (2, 3, 4, 8)])
def test_linear_equals_dense_on_every_rank(shape):
    """Linear's 2-D matmul gives Keras Dense's result for inputs of any rank (1e-6: the two
    are different oneDNN kernels, which may sum in a different order)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(np.float32)
    linear = L.Linear(5, activation="gelu")
    ref = keras.layers.Dense(5, activation="gelu")
    linear.build(shape)
    ref.build(shape)
    for w in linear.weights:
        w.assign(rng.standard_normal(w.shape))
    ref.set_weights(linear.get_weights())
    got = linear(x)
    assert tuple(got.shape) == shape[:-1] + (5,)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref(x)), rtol=1e-6, atol=1e-6)


def test_linear_keeps_unknown_token_dimensions():
    """Unknown sizes between the batch and the channels (a model built for any input size)
    are restored from the input's runtime shape."""
    import tensorflow as tf

    linear = L.Linear(4)
    linear.build((None, None, None, 3))
    fn = tf.function(linear, input_signature=[tf.TensorSpec((None, None, None, 3))])
    x = np.ones((2, 5, 7, 3), np.float32)
    got = fn(x)
    assert tuple(got.shape) == (2, 5, 7, 4)
    # 1e-6: numpy's and oneDNN's float32 sums of 3 products may differ in the last bit
    np.testing.assert_allclose(np.asarray(got), x @ np.asarray(linear.kernel), atol=1e-6)


def grappler_optimized_ops(fn, spec, freeze=True):
    """(op, fused_ops) of every node of ``fn``'s graph after TensorFlow's graph optimizer
    (grappler) has rewritten it for the CPU, as tf.function does before running it; with
    ``freeze=False`` its variables stay variables, as in tf.function (frozen, grappler may
    fold what reads them into constants)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.framework import meta_graph
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2)
    from tensorflow.python.grappler import tf_optimizer

    frozen = tf.function(fn).get_concrete_function(spec)
    if freeze:
        frozen = convert_variables_to_constants_v2(frozen)
    graph_def = frozen.graph.as_graph_def()
    for node in graph_def.node:  # the remapper fuses only nodes placed on a CPU
        node.device = "/job:localhost/replica:0/task:0/device:CPU:0"
    meta = meta_graph.create_meta_graph_def(graph_def=graph_def, graph=frozen.graph)
    meta.collection_def["train_op"].node_list.value.extend(t.op.name for t in frozen.outputs)
    config = config_pb2.ConfigProto()
    config.graph_options.rewrite_options.min_graph_nodes = -1
    optimized = tf_optimizer.OptimizeGraph(config, meta)
    return [(n.op, [s.decode() for s in n.attr["fused_ops"].list.s]) for n in optimized.node]


def test_transformer_block_linear_layers_fuse_with_bias_and_gelu():
    """What makes TensorFlow inference on CPU fast (benchmarks/README.md): every linear
    layer of a transformer block is one fused MatMul + BiasAdd, fc1 with its GELU too. On
    (B, N, C) tokens Keras' Dense puts a Reshape between MatMul and bias and none fuse."""
    import tensorflow as tf

    block = L.TransformerBlock(16, num_heads=2)
    block.build((2, 5, 16))
    rng = np.random.default_rng(3)
    for w in block.weights:  # zero biases would be folded away before fusion
        w.assign(rng.standard_normal(w.shape) * 0.1)
    ops = grappler_optimized_ops(lambda x: block(x), tf.TensorSpec((2, 5, 16)))
    assert not [op for op, _ in ops if op == "MatMul"]
    fused = sorted(tuple(f) for op, f in ops if op == "_FusedMatMul")
    assert fused == [("BiasAdd",)] * 3 + [("BiasAdd", "GeluExact")]
    # and both LayerNorms are one oneDNN kernel each, none of their eight element-wise ops left
    assert [op for op, _ in ops].count("_MklLayerNorm") == 2
    assert not {"Mean", "Rsqrt", "SquaredDifference", "FusedBatchNormV3"} & {op for op, _ in ops}


@pytest.mark.parametrize("kind", ["self", "cross", "xca"])
def test_attention_gradient_has_no_strided_slice_gradients(kind):
    """q, k, v (and cross-attention's k, v; XCiT's channel attention's q, k, v) come out of
    one split, whose gradient is one concat: a slice's gradient is a zero-filled tensor of
    the full qkv size per slice, summed (ViT-S float32 train step 5.37 -> 6.03 img/s,
    Swin-T 3.99 -> 4.82; benchmarks/README.md)."""
    import tensorflow as tf

    from keras_vit.models.xcit import XCA

    cross = kind == "cross"
    attn = (XCA if kind == "xca" else L.MultiHeadAttention)(16, num_heads=2, cross=cross)
    x = tf.random.normal((2, 5, 16))
    attn.build(x.shape)  # XCA's build keeps MultiHeadAttention's (x, context) signature
    attn(x, x) if cross else attn(x)

    @tf.function
    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum((attn(x, x) if cross else attn(x)) ** 2)
        return tape.gradient(loss, [x] + attn.trainable_variables)

    graph = grads.get_concrete_function(tf.TensorSpec((2, 5, 16))).graph
    op_types = {op.type for op in graph.get_operations()}
    assert "BatchMatMulV2" in op_types and "ConcatV2" in op_types  # the backward pass is there
    assert "StridedSliceGrad" not in op_types and op_types & {"Split", "SplitV"}


def test_cyclic_shift_equals_roll_and_its_gradient_has_no_strided_slice_gradients():
    """Swin's shift is torch.roll as a split and a concat: equal to tf.roll, and its gradient
    one concat (two slices' gradients were 154 of ~1,770 ms of a Swin-T train step)."""
    import tensorflow as tf

    from keras_vit.layers.window import cyclic_shift

    x = tf.random.normal((2, 7, 7, 3))
    np.testing.assert_array_equal(np.asarray(cyclic_shift(x, -3)),
                                  np.asarray(tf.roll(x, shift=(-3, -3), axis=(1, 2))))

    @tf.function
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(cyclic_shift(x, -3) ** 2)
        return tape.gradient(loss, x)

    op_types = {op.type for op in grad.get_concrete_function(
        tf.TensorSpec((2, 7, 7, 3))).graph.get_operations()}
    assert "StridedSliceGrad" not in op_types and op_types & {"Split", "SplitV"}


def _layer_norm_pair(shape, seed):
    """The project's LayerNorm and Keras' own with the same random gamma and beta."""
    rng = np.random.default_rng(seed)
    ours, ref = L.LayerNorm(epsilon=1e-6), keras.layers.LayerNormalization(epsilon=1e-6)
    ours.build(shape)
    ref.build(shape)
    ours.set_weights([rng.standard_normal(shape[-1:]).astype(np.float32) for _ in range(2)])
    ref.set_weights(ours.get_weights())
    return ours, ref, (rng.standard_normal(shape) * 3 + 1).astype(np.float32)


@pytest.mark.parametrize("shape", [(6, 16), (2, 5, 16), (2, 3, 4, 16)])
def test_layer_norm_equals_keras_and_fuses_on_every_rank(shape):
    """LayerNorm gives Keras' LayerNormalization's outputs and gradients (1e-5: the oneDNN
    batch-norm kernel sums in another order), eagerly and as a graph, and the graph is one
    fused _MklLayerNorm for Swin's (B, H, W, C) maps as for (B, N, C) tokens."""
    import tensorflow as tf

    ours, ref, x = _layer_norm_pair(shape, seed=5)
    want = np.asarray(ref(x))
    # 1e-5 on outputs of unit scale (x ~ 3 N(0,1) + 1, gamma, beta ~ N(0,1)): the batch-norm
    # kernel sums the mean and variance in another order than Keras' reductions, float32 ulps
    np.testing.assert_allclose(np.asarray(ours(x)), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tf.function(ours)(x)), want, atol=1e-5)
    x = tf.constant(x)
    grads = []
    for layer in (ours, ref):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) ** 2)
        grads.append(tape.gradient(loss, [x] + layer.trainable_variables))
    for got, ref_grad in zip(*grads):
        # 1e-4: the gradients sum over up to 24 rows of terms of size ~10 (loss = sum y^2),
        # so the last-bit differences of the forward sums grow by that much; a wrong
        # gradient formula would be off by O(1)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref_grad), rtol=1e-4, atol=1e-4)
    ops = {op for op, _ in grappler_optimized_ops(ours, tf.TensorSpec(shape))}
    assert "_MklLayerNorm" in ops and not {"Mean", "Rsqrt", "FusedBatchNormV3"} & ops


def test_layer_norm_under_mixed_bfloat16_and_unknown_batch():
    """Under mixed_bfloat16 the normalisation still runs in float32 (as Keras' does), fused,
    and returns bfloat16 equal to Keras' result; an unknown batch size traces and runs."""
    import tensorflow as tf

    ours, ref, x = _layer_norm_pair((2, 5, 16), seed=6)
    ours_bf = L.LayerNorm(epsilon=1e-6, dtype="mixed_bfloat16")
    ref_bf = keras.layers.LayerNormalization(epsilon=1e-6, dtype="mixed_bfloat16")
    for layer in (ours_bf, ref_bf):
        layer.build(x.shape)
        layer.set_weights(ours.get_weights())
    got = ours_bf(tf.cast(x, tf.bfloat16))
    assert got.dtype == tf.bfloat16
    # fused in bfloat16 models too (grappler would move the float32 cast past the reshape)
    ops = {op for op, _ in grappler_optimized_ops(ours_bf, tf.TensorSpec(x.shape, tf.bfloat16))}
    assert "_MklLayerNorm" in ops and "FusedBatchNormV3" not in ops
    np.testing.assert_array_equal(np.asarray(tf.cast(got, tf.float32)),
                                  np.asarray(tf.cast(ref_bf(tf.cast(x, tf.bfloat16)), tf.float32)))
    # float64 (the float64 parity fixtures) has no fused kernel: Keras' own call, exactly
    ours64 = L.LayerNorm(epsilon=1e-6, dtype="float64")
    ref64 = keras.layers.LayerNormalization(epsilon=1e-6, dtype="float64")
    np.testing.assert_array_equal(np.asarray(ours64(x.astype(np.float64))),
                                  np.asarray(ref64(x.astype(np.float64))))
    fn = tf.function(ours, input_signature=[tf.TensorSpec((None, 5, 16))])
    for batch in (1, 3):
        xb = np.repeat(x[:1], batch, axis=0)
        # 1e-5: the fused kernel's and Keras' float32 sums differ in the last bits (above)
        np.testing.assert_allclose(np.asarray(fn(xb)), np.asarray(ref(xb)), atol=1e-5)


def test_layer_norm_converts_to_tflite_without_transposes(tmp_path):
    """The TFLite converter traces Keras' own LayerNorm form (MEAN / RSQRT / MUL): the fused
    form's NCHW batch norm would convert with TRANSPOSEs around it."""
    from keras_vit.export.tflite import LiteRTRunner, export_tflite

    ours, ref, x = _layer_norm_pair((1, 5, 16), seed=7)
    inputs = keras.Input((5, 16))
    model = keras.Model(inputs, ours(inputs))
    path = tmp_path / "ln.tflite"
    export_tflite(model, str(path))
    runner = LiteRTRunner(str(path))
    op_names = {d["op_name"] for d in runner.interpreter._get_ops_details()}
    assert "TRANSPOSE" not in op_names and "MEAN" in op_names
    # 1e-5: LiteRT's float32 MEAN/RSQRT kernels round differently from TensorFlow's
    np.testing.assert_allclose(runner(x), np.asarray(ref(x)), atol=1e-5)


def _batch_norm_pair(channels, seed):
    """The project's BatchNorm and Keras' own with the same random affine and statistics."""
    rng = np.random.default_rng(seed)
    ours, ref = L.batch_norm(), keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)
    for layer in (ours, ref):
        layer.build((None, 6, 6, channels))
    ours.set_weights([rng.standard_normal(channels).astype(np.float32),  # gamma, beta, mean
                      rng.standard_normal(channels).astype(np.float32),
                      rng.standard_normal(channels).astype(np.float32),
                      rng.uniform(0.5, 2.0, channels).astype(np.float32)])  # variance
    ref.set_weights(ours.get_weights())
    return ours, ref, (rng.standard_normal((2, 6, 6, channels)) * 2).astype(np.float32)


def test_batch_norm_equals_keras_and_fuses_into_the_convolution():
    """BatchNorm gives Keras' BatchNormalization's inference outputs (1e-5: one fused kernel
    against Keras' multiply-add, float32 round-off on outputs of scale ~5), trains exactly as
    it (Keras' own code), and in a graph after grappler Conv2D + BatchNorm + ReLU is one
    oneDNN convolution, where Keras' form leaves the multiply and add over the map."""
    import tensorflow as tf

    ours, ref, x = _batch_norm_pair(8, seed=11)
    want = np.asarray(ref(x, training=False))
    # 1e-5 on outputs up to ~8: the fused kernel computes (x - mean) * rsqrt(var + eps) in
    # another order than Keras' x * scale + shift, measured 4.8e-7 apart (float32 ulps); a
    # real error moves them far more (epsilon 1e-3 instead of 1e-5: 4.2e-3)
    np.testing.assert_allclose(np.asarray(ours(x, training=False)), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tf.function(lambda t: ours(t))(x)), want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ours(x, training=True)),
                                  np.asarray(ref(x, training=True)))
    np.testing.assert_array_equal(np.asarray(ours.moving_mean), np.asarray(ref.moving_mean))
    # frozen (trainable=False) it normalises with its statistics in training too, where the
    # gradient runs through the fused op: Keras' gradient within 1e-5 (values up to ~21,
    # measured 1.9e-6 apart: the same float32 reordering as above)
    grads = []
    for layer in (ours, ref):
        layer.trainable = False
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(layer(xt, training=True) ** 2)
        grads.append(np.asarray(tape.gradient(loss, xt)))
        layer.trainable = True
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-5)

    conv = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)  # as before a norm
    conv.build((None, 6, 6, 8))
    spec = tf.TensorSpec((2, 6, 6, 8))
    ops = grappler_optimized_ops(lambda t: tf.nn.relu(ours(conv(t), training=False)), spec,
                                 freeze=False)
    assert ("_FusedConv2D", ["FusedBatchNorm", "Relu"]) in ops, ops
    assert not {"Conv2D", "Mul", "AddV2", "FusedBatchNormV3", "Relu"} & {op for op, _ in ops}
    keras_ops = {op for op, _ in grappler_optimized_ops(
        lambda t: tf.nn.relu(ref(conv(t), training=False)), spec, freeze=False)}
    assert {"Conv2D", "Mul", "AddV2", "Relu"} <= keras_ops, keras_ops  # nothing fused


def test_batch_norm_converts_to_tflite_as_keras_form(tmp_path):
    """The TFLite converter traces Keras' BatchNorm form, the file matching Keras."""
    from keras_vit.export.tflite import LiteRTRunner, export_tflite

    ours, ref, x = _batch_norm_pair(8, seed=12)
    inputs = keras.Input((6, 6, 8))
    path = tmp_path / "bn.tflite"
    export_tflite(keras.Model(inputs, ours(inputs)), str(path), batch_size=2)
    # 1e-5: LiteRT's float32 MUL/ADD round differently from TensorFlow's kernels
    np.testing.assert_allclose(LiteRTRunner(str(path))(x), np.asarray(ref(x, training=False)),
                               atol=1e-5)


def test_graph_forward_equals_the_eager_call_for_every_batch_size():
    """What apps/evaluate.py and the trainer's accuracy run: the model as a tf.function
    (fused linear layers) gives the eager call's logits, for full and ragged last batches
    (1e-5: fused and unfused oneDNN kernels sum in a different order)."""
    from keras_vit import create_model
    from keras_vit.models.common import graph_forward

    model = create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
    forward = graph_forward(model)
    rng = np.random.default_rng(4)
    for batch in (4, 3, 4, 1):
        x = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(forward(x)),
                                   np.asarray(model(x, training=False)), atol=1e-5)
