"""Swin Transformer (Liu et al. 2021): a hierarchical transformer with shifted-window attention.

Patch embedding (4x4), four stages of Swin blocks (windowed attention with
relative position bias, every second block on windows shifted by half a
window), patch merging (2x2 neighbours -> linear 4C -> 2C) between stages,
a final LayerNorm, global average pooling and a linear head. Names,
hyperparameters and outputs match timm's ``swin_transformer.py`` (timm 1.0.31).

Complete against timm 1.0.31: every ``swin_*`` variant, including the ``swin_s3_*``
architectures (Chen et al. 2021, "Searching the Search Space of Vision Transformers"),
which are Swin with a window per stage.
"""

import keras
from keras import ops

from keras_vit.layers import PatchEmbed, dense
from keras_vit.layers.common import layer_norm
from keras_vit.layers.window import SwinTransformerBlock, swin_window_and_shift
from keras_vit.layers.embedding import to_2tuple
from keras_vit.models.common import (
    check_img_size,
    check_in_chans,
    drop_path_rates,
    per_stage,
    resolve_out_indices,
)
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant

NORM_EPS = 1e-5  # timm's Swin uses nn.LayerNorm's default


@keras.saving.register_keras_serializable(package="keras_vit")
class PatchMerging(keras.layers.Layer):
    """2x2 neighbouring tokens concatenated, normalised and projected: (B, H, W, C) ->
    (B, ceil(H/2), ceil(W/2), out_dim) (timm's ``PatchMerging``: norm, reduction).

    An odd side is zero-padded at the bottom / right first. The concatenation
    order is timm's (and the original Swin's): (0,0), (1,0), (0,1), (1,1) as
    (row, column) offsets, so checkpoints load unchanged. Reshapes and transposes keep
    it 4-D.
    """

    def __init__(self, out_dim=None, norm_eps=NORM_EPS, **kwargs):
        super().__init__(**kwargs)
        self.out_dim = int(out_dim) if out_dim else None
        self.norm_eps = float(norm_eps)
        self.norm = layer_norm(norm_eps, name="norm")
        self.reduction = None

    def build(self, input_shape):
        c = input_shape[-1]
        self.reduction = dense(self.out_dim or 2 * c, use_bias=False, name="reduction")
        self.norm.build((None, None, None, 4 * c))
        self.reduction.build((None, None, None, 4 * c))

    def call(self, x):
        _, h, w, c = x.shape
        if h % 2 or w % 2:
            x = ops.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        # Two 4-D transposes, not four stride-2 slices: XNNPACK takes only unit-stride
        # slices, so the slices left TFLite's fast path (Swin-T batch 1: 50.3 -> 47.7 ms).
        x = ops.reshape(x, (-1, 2, w2, 2 * c))  # (B*h2, row offset, w2, column offset * C)
        x = ops.transpose(x, (0, 2, 1, 3))
        x = ops.reshape(x, (-1, 2, 2, c))  # (B*h2*w2, row offset, column offset, C)
        x = ops.transpose(x, (0, 2, 1, 3))  # timm's order: column offset major
        x = ops.reshape(x, (-1, h2, w2, 4 * c))
        return self.reduction(self.norm(x))

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        half = lambda s: None if s is None else (s + 1) // 2  # noqa: E731
        return (b, half(h), half(w), self.out_dim or 2 * c)

    def get_config(self):
        return {**super().get_config(), "out_dim": self.out_dim, "norm_eps": self.norm_eps}


def stage_resolutions(grid, num_stages):
    """Token-map size of each stage: the patch grid, then halved (rounded up) per stage."""
    sizes = [tuple(grid)]
    for _ in range(num_stages - 1):
        sizes.append(tuple((s + 1) // 2 for s in sizes[-1]))
    return sizes


def swin_transformer(*, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96,
                     depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
                     qkv_bias=True, head_dim=None, drop_rate=0.0, proj_drop_rate=0.0,
                     attn_drop_rate=0.0, drop_path_rate=0.1, features_only=False,
                     out_indices=None, name="swin"):
    """Builds a Swin Transformer as a functional model (timm's ``SwinTransformer``).

    img_size: int or (h, w), any multiple of ``patch_size`` (otherwise a
    ValueError naming the valid neighbours). As timm 1.0.31 (always_partition
    off) for other sizes: in a stage whose resolution is not larger than the
    window along an axis, the window is clipped to the resolution and that axis
    is not shifted (this also shrinks ``relative_position_bias_table``; loading
    a checkpoint made for another window resizes it, see
    ``keras_vit.convert.swin``); a resolution that is not a multiple of the
    window is zero-padded at the bottom / right inside each block (after the
    cyclic shift, the mask built for the padded size), and an odd resolution
    is padded before patch merging (timm's ``always_partition`` and
    ``dynamic_img_size`` are not offered: sizes are static, masks are numpy
    constants). window_size: an int or (h, w) for all
    stages, or one per stage. drop_path_rate: timm's default 0.1, rising
    linearly over all blocks. features_only: the stage outputs (before the
    final norm) as NHWC maps at strides patch_size * (1, 2, 4, 8);
    out_indices: stage indices (default all), or an int n for the last n.
    """
    num_stages = len(depths)
    if len(num_heads) != num_stages:
        raise ValueError(f"num_heads {num_heads} needs one entry per stage of depths {depths}")
    h, w = check_img_size(img_size, patch_size)
    check_in_chans(in_chans)
    windows = _stage_windows(window_size, num_stages)
    dims = ([int(embed_dim * 2 ** i) for i in range(num_stages)]
            if not isinstance(embed_dim, (tuple, list)) else [int(d) for d in embed_dim])
    head_dims = per_stage(head_dim, num_stages, "head_dim")
    mlp_ratios = per_stage(mlp_ratio, num_stages, "mlp_ratio")
    if features_only:
        out_indices = resolve_out_indices(out_indices, num_stages, default="all", what="stages")
    resolutions = stage_resolutions((h // patch_size, w // patch_size), num_stages)
    dpr = drop_path_rates(drop_path_rate, sum(depths))

    inputs = keras.Input((h, w, in_chans), name="images")
    x = PatchEmbed(patch_size, dims[0], norm=True, flatten=False, norm_eps=NORM_EPS,
                   name="patch_embed")(inputs)
    features, block = [], 0
    for i in range(num_stages):
        if i > 0:
            x = PatchMerging(dims[i], name=f"layers.{i}.downsample")(x)
        for j in range(depths[i]):
            window, shift = swin_window_and_shift(resolutions[i], windows[i], shifted=j % 2 == 1)
            x = SwinTransformerBlock(dims[i], num_heads[i], window, shift, mlp_ratio=mlp_ratios[i],
                                     qkv_bias=qkv_bias, drop=proj_drop_rate,
                                     attn_drop=attn_drop_rate, drop_path=dpr[block],
                                     norm_eps=NORM_EPS, head_dim=head_dims[i],
                                     name=f"layers.{i}.blocks.{j}")(x)
            block += 1
        if features_only and i in out_indices:
            features.append(x)
    if features_only:
        return keras.Model(inputs, features, name=name)

    x = layer_norm(NORM_EPS, name="norm")(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="head.global_pool")(x)
    if not num_classes:
        return keras.Model(inputs, pooled, name=name)
    pooled = keras.layers.Dropout(drop_rate, name="head.drop")(pooled)
    logits = dense(num_classes, name="head.fc")(pooled)
    return keras.Model(inputs, logits, name=name)


def _stage_windows(window_size, num_stages):
    """timm's ``resolve_stage_window_sizes``: one (h, w) window per stage."""
    if not isinstance(window_size, (list, tuple)):
        window_size = (window_size,) * num_stages
    elif len(window_size) == 2 and not isinstance(window_size[0], (list, tuple)):
        window_size = (tuple(window_size),) * num_stages  # two ints are always one (h, w)
    if len(window_size) != num_stages:
        raise ValueError(f"expected {num_stages} stage window sizes, got {window_size}")
    windows = tuple(to_2tuple(ws) for ws in window_size)
    if any(v <= 0 for ws in windows for v in ws):
        raise ValueError(f"window sizes must be positive, got {window_size}")
    return windows


def _swin(name, img_size=224, window_size=7, **arch):
    cfg = dict(input_size=img_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
               crop_pct=1.0 if img_size >= 384 else 0.9)
    return register_variant(name, swin_transformer, __name__, cfg, img_size=img_size,
                            patch_size=4, window_size=window_size, **arch)


TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
LARGE = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))

_swin("swin_tiny_patch4_window7_224", **TINY)
_swin("swin_small_patch4_window7_224", **SMALL)
_swin("swin_base_patch4_window7_224", **BASE)
_swin("swin_base_patch4_window12_384", img_size=384, window_size=12, **BASE)
_swin("swin_large_patch4_window7_224", **LARGE)
_swin("swin_large_patch4_window12_384", img_size=384, window_size=12, **LARGE)
_swin("swin_s3_tiny_224", window_size=(7, 7, 14, 7), **TINY)
_swin("swin_s3_small_224", window_size=(14, 14, 14, 7), **SMALL)
_swin("swin_s3_base_224", window_size=(7, 7, 14, 7), embed_dim=96, depths=(2, 2, 30, 2),
      num_heads=(3, 6, 12, 24))
