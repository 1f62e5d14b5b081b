"""What every builder shares: argument checks run before anything is built, the
``features_only`` convention, and the ViT-style tail (blocks -> token maps, or norm ->
pool -> head) that token-based families end in."""

import keras

from keras_vit.layers.common import dense, layer_norm
from keras_vit.layers.embedding import to_2tuple
from keras_vit.layers.pooling import TokenPool, TokensToMap
from keras_vit.layers.regularization import LayerDrop


def check_img_size(img_size, divisor, what="patch_size"):
    """(h, w) from an int or pair; a ValueError naming the valid neighbours if not divisible."""
    h, w = to_2tuple(img_size)
    for side in (h, w):
        if side <= 0 or side % divisor:
            lower = max(divisor, side // divisor * divisor)
            upper = (side // divisor + 1) * divisor
            raise ValueError(f"img_size {img_size} is not a multiple of {what} {divisor}; "
                             f"valid neighbours: {lower} or {upper}")
    return h, w


def check_in_chans(in_chans):
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    return in_chans


def resolve_out_indices(out_indices, depth, default=3, what="blocks"):
    """The one ``features_only`` / ``out_indices`` convention of every family (timm's):
    None -> ``default`` (an int n or a tuple; ``"all"`` for every block/stage), an int n ->
    the last n, a sequence -> those indices, negative ones counting from the end. Returns a
    sorted-as-given tuple of non-negative indices; a ValueError names the valid range."""
    if out_indices is None:
        out_indices = tuple(range(depth)) if default == "all" else default
    if isinstance(out_indices, int):
        if not 1 <= out_indices <= depth:
            raise ValueError(f"out_indices={out_indices} asks for the last {out_indices} of "
                             f"{depth} {what}; use 1 ... {depth}")
        return tuple(range(depth - out_indices, depth))
    resolved = []
    for i in out_indices:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"out index {i} is out of range for {depth} {what} "
                             f"(valid: {-depth} ... {depth - 1})")
        resolved.append(j)
    return tuple(resolved)


def per_stage(value, n, what):
    """A per-stage tuple from one value or a sequence of n; a ValueError otherwise."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n:
        raise ValueError(f"{what} needs one value per stage ({n}), got {value!r}")
    return values


def drop_path_rates(drop_path_rate, depth):
    """Stochastic depth rate rising linearly from 0 to drop_path_rate over the blocks."""
    if depth == 1:
        return [0.0]
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]


def _itself(out):
    return out


def transformer_blocks(x, block, depth, drop_path_rate=0.0, *, grid=None, num_prefix_tokens=1,
                       features_only=False, out_indices=None, tokens=_itself, layer_drop=0.0):
    """``x`` through ``depth`` blocks ``block(i, drop_path)`` with stochastic depth rising
    linearly. Returns (x, feature maps): with ``features_only``, the (B, gh, gw, D) token
    maps (layers ``feature_i``) after the ``out_indices`` blocks (``resolve_out_indices``,
    default the last 3). ``tokens`` picks the tokens out of a block's output where that
    holds more (TNT's [pixels, patches]). ``layer_drop``: each whole block skipped with
    that probability in training (``LayerDrop``; keras_vit.compress.keep_blocks then
    removes blocks after training)."""
    indices = set(resolve_out_indices(out_indices, depth)) if features_only else ()
    features = []
    for i, dpr in enumerate(drop_path_rates(drop_path_rate, depth)):
        computed = block(i, dpr)(x)
        x = LayerDrop(layer_drop, name=f"layer_drop.{i}")([x, computed]) if layer_drop else computed
        if i in indices:
            features.append(TokensToMap(grid, num_prefix_tokens, name=f"feature_{i}")(tokens(x)))
    return x, features


def classifier_model(inputs, pooled, num_classes, name, drop_rate=None, dist=None,
                     distilled_training=False):
    """The functional model of a classifier on ``pooled`` features: Dropout ``head_drop``
    (where the family has one: ``drop_rate`` not None), then the Linear ``head``;
    ``num_classes=0`` gives the pooled features. ``dist``: DeiT's / PiT's distillation
    token, with its own Linear ``head_dist``: the output is the mean of the two heads, or
    both (``distilled_training``)."""
    if num_classes:
        if drop_rate is not None:
            pooled = keras.layers.Dropout(drop_rate, name="head_drop")(pooled)
        pooled = dense(num_classes, name="head")(pooled)
        if dist is not None:
            dist = dense(num_classes, name="head_dist")(dist)
    if dist is None:
        outputs = pooled
    elif distilled_training:
        outputs = [pooled, dist]
    else:
        outputs = keras.layers.Average(name="head_average")([pooled, dist])
    return keras.Model(inputs, outputs, name=name)


def token_trunk_model(inputs, x, block, depth, *, grid, num_classes, name, drop_path_rate=0.0,
                      num_prefix_tokens=1, features_only=False, out_indices=None, tokens=_itself,
                      norm_eps=1e-6, global_pool="token", drop_rate=None):
    """The ViT-style trunk from its first block on, as a functional model: ``depth`` blocks
    (``transformer_blocks``), then the ``features_only`` token maps, or the final
    LayerNorm ``norm``, pooling ``pool`` (timm's global_pool: "token" or "avg") and
    ``classifier_model``'s head."""
    x, features = transformer_blocks(x, block, depth, drop_path_rate, grid=grid,
                                     num_prefix_tokens=num_prefix_tokens,
                                     features_only=features_only, out_indices=out_indices,
                                     tokens=tokens)
    if features_only:
        return keras.Model(inputs, features, name=name)
    x = layer_norm(norm_eps, name="norm")(tokens(x))
    pooled = TokenPool(global_pool, num_prefix_tokens, name="pool")(x)
    return classifier_model(inputs, pooled, num_classes, name, drop_rate=drop_rate)


def graph_forward(model):
    """``model(x, training=False)`` as a TensorFlow graph (a tf.function that retraces once
    for a new batch size, not for every one); the plain call on other backends. Called
    eagerly, a model runs op by op; in a graph, grappler fuses each linear layer with its
    bias and activation (layers.Linear), which bfloat16 inference on CPU needs most."""
    if keras.backend.backend() != "tensorflow":
        return lambda x: model(x, training=False)
    import tensorflow as tf

    return tf.function(lambda x: model(x, training=False), reduce_retracing=True)


def count_parameters(model):
    """Parameters as torch counts them: every weight but BatchNorm's running statistics
    (buffers in torch, non-trainable weights in Keras)."""
    import keras
    import numpy as np

    stats = sum(int(np.prod(v.shape)) for layer in model._flatten_layers()
                if isinstance(layer, keras.layers.BatchNormalization)
                for v in (layer.moving_mean, layer.moving_variance))
    return model.count_params() - stats


def count_macs(model):
    """Multiply-accumulates of one inference at batch 1, from the Keras graph: TensorFlow's
    profiler counts the traced graph's float ops (2 per MAC in MatMul/Conv); returns /2.
    Weights stay variables (reads count no ops), so no graph holds them: the count equals
    the frozen graph's, takes a third of the time and works past protobuf's 2 GB limit."""
    import tensorflow as tf

    spec = tf.TensorSpec((1,) + tuple(model.inputs[0].shape[1:]), tf.float32)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    graph = fn.get_concrete_function().graph
    return tf.compat.v1.profiler.profile(graph=graph, options=opts).total_float_ops // 2
