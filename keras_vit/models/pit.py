"""PiT, Pooling-based Vision Transformer (Heo et al. 2021, "Rethinking Spatial Dimensions of
Vision Transformers"): an overlapping conv patch embedding with a learned position embedding
on the map, then three transformer stages whose token maps shrink by depthwise-conv pooling
(the class / distillation tokens go through a Linear) while the width doubles.

Names, hyperparameters and outputs match timm's ``pit.py``.
"""

import keras
from keras import ops

from keras_vit.layers import (
    MapPositionEmbedding,
    PrefixTokens,
    TokenPool,
    TransformerBlock,
    dense,
    layer_norm,
)
from keras_vit.layers.embedding import to_2tuple
from keras_vit.models.common import (
    check_in_chans,
    classifier_model,
    drop_path_rates,
    resolve_out_indices,
)
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant


@keras.saving.register_keras_serializable(package="keras_vit")
class JoinTokens(keras.layers.Layer):
    """[prefix (B, T, C), map (B, H, W, C)] -> (B, T + H*W, C): tokens in timm's order."""

    def call(self, inputs):
        prefix, grid = inputs
        tokens = ops.reshape(grid, (-1, grid.shape[1] * grid.shape[2], grid.shape[3]))
        return ops.concatenate([ops.cast(prefix, tokens.dtype), tokens], axis=1)

    def compute_output_shape(self, input_shape):
        (b, t, c), (_, h, w, _) = input_shape
        return (b, t + h * w, c)


@keras.saving.register_keras_serializable(package="keras_vit")
class SplitTokens(keras.layers.Layer):
    """(B, T + H*W, C) -> [prefix (B, T, C), map (B, H, W, C)], the inverse of ``JoinTokens``."""

    def __init__(self, grid_size, num_prefix_tokens=1, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = to_2tuple(grid_size)
        self.num_prefix_tokens = int(num_prefix_tokens)

    def call(self, x):
        t = self.num_prefix_tokens
        grid = ops.reshape(x[:, t:], (-1,) + self.grid_size + (x.shape[-1],))
        return [x[:, :t], grid]

    def compute_output_shape(self, input_shape):
        b, _, c = input_shape
        return [(b, self.num_prefix_tokens, c), (b,) + self.grid_size + (c,)]

    def get_config(self):
        return {**super().get_config(), "grid_size": self.grid_size,
                "num_prefix_tokens": self.num_prefix_tokens}


def _conv_out(size, kernel, stride, padding=0):
    return (size + 2 * padding - kernel) // stride + 1


def check_pit_img_size(img_size, patch_size, stride):
    """(h, w) where the stem's (patch_size, stride) convolution tiles the image exactly."""
    h, w = to_2tuple(img_size)
    for side in (h, w):
        if side < patch_size or (side - patch_size) % stride:
            k = max(0, (side - patch_size) // stride)
            lower, upper = patch_size + k * stride, patch_size + (k + 1) * stride
            raise ValueError(f"img_size {img_size} is not covered exactly by the {patch_size} px "
                             f"stem with stride {stride}: a side must be {patch_size} + a multiple "
                             f"of {stride}; valid neighbours: {lower} or {upper}")
    return h, w


def pooling_vision_transformer(*, img_size=224, patch_size=16, stride=8, base_dims=(48, 48, 48),
                               depth=(2, 6, 4), heads=(2, 4, 8), mlp_ratio=4.0, num_classes=1000,
                               in_chans=3, distilled=False, distilled_training=False,
                               drop_rate=0.0, pos_drop_rate=0.0, proj_drop_rate=0.0,
                               attn_drop_rate=0.0, drop_path_rate=0.0, features_only=False,
                               out_indices=None, name="pit"):
    """Builds a PiT (timm ``PoolingVisionTransformer``) as a functional model.

    Stage i has width ``base_dims[i] * heads[i]``; between stages a depthwise
    conv (kernel 3, stride 2, padding 1) halves the map and a Linear maps the
    class tokens. ``distilled``: two prefix tokens and ``head_dist``; the
    output is the mean of the two heads unless ``distilled_training`` (then
    [cls_logits, dist_logits]). features_only: the stage maps of ``out_indices``
    (default all three; strides ``stride`` * 1, 2, 4) as NHWC.
    """
    h, w = check_pit_img_size(img_size, patch_size, stride)
    check_in_chans(in_chans)
    if not len(base_dims) == len(depth) == len(heads):
        raise ValueError("base_dims, depth and heads need one entry per stage")
    dims = [b * n for b, n in zip(base_dims, heads)]
    for prev, dim in zip(dims, dims[1:]):
        if dim % prev:
            raise ValueError(f"stage width {dim} must be a multiple of the previous width {prev} "
                             "(the pooling conv is grouped by the input channels)")
    num_tokens = 2 if distilled else 1
    grid = (_conv_out(h, patch_size, stride), _conv_out(w, patch_size, stride))

    inputs = keras.Input((h, w, in_chans), name="images")
    x = keras.layers.Conv2D(dims[0], patch_size, strides=stride, padding="valid",
                            name="patch_embed.conv")(inputs)
    x = MapPositionEmbedding(grid, name="pos_embed")(x)
    x = keras.layers.Dropout(pos_drop_rate, name="pos_drop")(x)
    x = keras.layers.Reshape((grid[0] * grid[1], dims[0]), name="flatten")(x)
    x = PrefixTokens(("cls_token",), counts=(num_tokens,), stddev=0.02, name="cls_token")(x)

    dpr = drop_path_rates(drop_path_rate, sum(depth))
    indices = set(resolve_out_indices(out_indices, len(depth))) if features_only else ()
    features, block = [], 0
    for i, (dim, d, n) in enumerate(zip(dims, depth, heads)):
        p = f"transformers.{i}"
        if i > 0:
            cls, grid_map = SplitTokens(grid, num_tokens, name=f"{p}.split")(x)
            # torch's Conv2d(padding=1, stride=2): pad explicitly, then a valid conv.
            grid_map = keras.layers.ZeroPadding2D(1, name=f"{p}.pool.pad")(grid_map)
            grid_map = keras.layers.DepthwiseConv2D(3, strides=2, padding="valid",
                                                    depth_multiplier=dim // dims[i - 1],
                                                    name=f"{p}.pool.conv")(grid_map)
            cls = dense(dim, name=f"{p}.pool.fc")(cls)
            grid = tuple(_conv_out(g, 3, 2, 1) for g in grid)
            x = JoinTokens(name=f"{p}.join")([cls, grid_map])
        for j in range(d):
            x = TransformerBlock(dim, n, mlp_ratio, qkv_bias=True, drop=proj_drop_rate,
                                 attn_drop=attn_drop_rate, drop_path=dpr[block],
                                 name=f"{p}.blocks.{j}")(x)
            block += 1
        if i in indices:
            features.append(SplitTokens(grid, num_tokens, name=f"feature_{i}")(x)[1])
    if features_only:
        return keras.Model(inputs, features, name=name)

    # timm's final norm sees only the class (and distillation) tokens.
    cls = SplitTokens(grid, num_tokens, name="split")(x)[0]
    cls = layer_norm(name="norm")(cls)
    cls = keras.layers.Dropout(drop_rate, name="head_drop")(cls)
    pooled = TokenPool("token", num_tokens, name="pool")(cls)
    dist = TokenPool("token", num_tokens, index=1, name="pool_dist")(cls) if distilled else None
    return classifier_model(inputs, pooled, num_classes, name, dist=dist,
                            distilled_training=distilled_training)


def _pit(name, **defaults):
    cfg = dict(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9,
               interpolation="bicubic")
    return register_variant(name, pooling_vision_transformer, __name__, cfg, img_size=224,
                            mlp_ratio=4.0, **defaults)


_ARCHS = {
    "ti": dict(patch_size=16, stride=8, base_dims=(32, 32, 32), depth=(2, 6, 4), heads=(2, 4, 8)),
    "xs": dict(patch_size=16, stride=8, base_dims=(48, 48, 48), depth=(2, 6, 4), heads=(2, 4, 8)),
    "s": dict(patch_size=16, stride=8, base_dims=(48, 48, 48), depth=(2, 6, 4), heads=(3, 6, 12)),
    "b": dict(patch_size=14, stride=7, base_dims=(64, 64, 64), depth=(3, 6, 4), heads=(4, 8, 16)),
}
for _size, _arch in _ARCHS.items():
    _pit(f"pit_{_size}_224", **_arch)
    _pit(f"pit_{_size}_distilled_224", distilled=True, **_arch)
