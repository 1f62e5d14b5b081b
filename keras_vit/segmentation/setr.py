"""SETR (Zheng et al. 2021, "Rethinking Semantic Segmentation from a Sequence-to-Sequence
Perspective with Transformers"): a ViT encoder and three decoders, as the official code
(fudan-zvg/SETR, an mmsegmentation fork) builds them.

- ``naive`` (``VisionTransformerUpHead``, num_conv=2, conv3x3_conv1x1=False): the last
  block's patch tokens ([CLS] dropped: the official ``N % 48`` test is true on every square
  grid), LayerNorm, 1x1 conv -> BatchNorm -> ReLU -> 1x1 conv to the
  classes, bilinear upsampling to the input size.
- ``pup`` (progressive upsampling, num_conv=4, num_upsampe_layer=4): four 3x3 conv ->
  BatchNorm -> ReLU stages, each followed by a 2x bilinear upsampling, the last after a 1x1
  conv to the classes: logits at 16x the token grid (the input size at patch 16).
- ``mla`` (multi-level aggregation, ``VIT_MLA`` + ``VIT_MLAHead``): four blocks' tokens,
  each LayerNormed, 1x1 convs summed top-down, 3x3 convs, then per level two 3x3 conv ->
  BN -> ReLU and a 4x upsampling (bilinear, align_corners=True as the official code
  hard-codes), concatenated, a 3x3 conv to the classes, upsampled to the input size.
  The official VIT_MLA drops the [CLS] token right after adding the position embedding,
  so its blocks see the patch tokens only (its cls_token and the first position
  embedding row are parameters without effect; kept here so checkpoints load as they are).

The encoder is keras_vit's ViT (PatchEmbed, [CLS], position embedding, TransformerBlocks
through models.common.transformer_blocks): the official VisionTransformer backbone is timm's
ViT without its final norm and head (the same module names and shapes; its block outputs
equal timm 1.0.31's forward_intermediates(norm=False) within 7e-7).

Every bilinear resize is F.interpolate's: align_corners=False (half-pixel centres) except
the MLA head's 4x. The official heads assume square inputs (``h = w = sqrt(N)``, sizes from
the width); here each side is scaled on its own, which is the same on square inputs.

Training heads (``aux_heads=True``: the model outputs [main, aux...]): the configs'
``auxiliary_head`` lists, each with loss weight 0.4 (the main head 1.0): naive, on blocks
(9, 14, 19) of ViT-L, the naive head; PUP, on blocks (9, 14, 19, 23), the naive head with a
3x3 conv and a 4x upsampling before the 1x1 conv (num_upsampe_layer=2); MLA, a 1x1 conv
(no bias) on each of the four MLA maps. Every auxiliary output is at the input size.

Weights: layer names are the official state dict's (``backbone.*``, ``decode_head.*``,
``auxiliary_head.N.*``); keras_vit/convert/setr.py leaves out the heads' unused
``conv_seg`` (mmseg's BaseDecodeHead builds it; these heads never call it) and, for a model
without training heads, the checkpoint's ``auxiliary_head.*``.

Variants: the paper's parameter table (SETR-Naive 305.67 M, PUP 318.31 M, MLA 310.57 M)
counts the official ADE20K models (512 x 512, 150 classes) with their auxiliary heads and
unused conv_seg layers; the ViT-L variants register that config. ``*_vit_base`` and
``*_deit_small`` are the same decoders on 12-block encoders, with the block indices of the
official 12-block configs (SETR_Naive_Base / SETR_PUP_DeiT / SETR_MLA_DeiT; the official
"DeiT" is DeiT-B distilled, whose encoder is ViT-B's; DeiT-S is the narrower width for
users without a pod).
"""

import keras
import numpy as np
from keras import ops

from keras_vit.layers import PatchEmbed, PositionEmbedding, PrefixTokens, TransformerBlock
from keras_vit.layers.common import batch_norm, layer_norm
from keras_vit.layers.embedding import to_2tuple
from keras_vit.layers.pooling import TokensToMap
from keras_vit.models.common import check_img_size, check_in_chans, transformer_blocks
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant

DECODERS = ("naive", "pup", "mla")
AUX_LOSS_WEIGHT = 0.4  # every auxiliary head of the official configs


def align_corners_matrix(in_size, out_size):
    """The (out, in) matrix of F.interpolate(mode="bilinear", align_corners=True) on one axis."""
    mat = np.zeros((out_size, in_size))
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    for i in range(out_size):
        src = i * scale
        x0 = min(int(np.floor(src)), in_size - 1)
        t = src - x0
        mat[i, x0] += 1 - t
        mat[i, min(x0 + 1, in_size - 1)] += t
    return mat


@keras.saving.register_keras_serializable(package="keras_vit")
class Interpolate(keras.layers.Layer):
    """Bilinear resize of (B, H, W, C) maps to ``size``, as torch's F.interpolate.

    align_corners=False: ``ops.image.resize`` (half-pixel centres, TFLite's builtin
    RESIZE_BILINEAR). align_corners=True: two constant interpolation matmuls (exact, and
    builtin in TFLite, which has no align-corners resize with torch's border handling)."""

    def __init__(self, size, align_corners=False, **kwargs):
        super().__init__(**kwargs)
        self.size = to_2tuple(size)
        self.align_corners = bool(align_corners)

    def call(self, x):
        if not self.align_corners:
            return ops.image.resize(x, self.size, interpolation="bilinear", antialias=False)
        h, w = x.shape[1], x.shape[2]
        mh = ops.convert_to_tensor(align_corners_matrix(h, self.size[0]), x.dtype)
        mw = ops.convert_to_tensor(align_corners_matrix(w, self.size[1]), x.dtype)
        x = ops.einsum("oh,bhwc->bowc", mh, x)
        return ops.einsum("pw,bowc->bopc", mw, x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + self.size + (input_shape[-1],)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "align_corners": self.align_corners}


def _conv(filters, kernel, name, bias=True):
    # padding=1 for 3x3 at stride 1 is "same"
    return keras.layers.Conv2D(filters, kernel, padding="same", use_bias=bias, name=name)


def _conv_bn_relu(x, filters, kernel, conv_name, bn_name, relu_name, bias=True):
    x = _conv(filters, kernel, conv_name, bias)(x)
    x = batch_norm(bn_name)(x)
    return keras.layers.ReLU(name=relu_name)(x)


def _scaled(x, factor):
    return (x.shape[1] * factor, x.shape[2] * factor)


def up_head(fmap, prefix, num_classes, out_size, *, kind, channels=256):
    """``VisionTransformerUpHead`` on a block's patch-token map (B, gh, gw, D):
    kind "naive" (1x1 conv, then to ``out_size``), "pup" (four 3x3 stages with 2x
    upsampling) or "aux_pup" (3x3 conv, 4x, 1x1 conv, then to ``out_size``)."""
    x = layer_norm(1e-6, name=f"{prefix}.norm")(fmap)
    kernel = 1 if kind == "naive" else 3
    stages = 4 if kind == "pup" else 1
    for i in range(stages):
        x = _conv_bn_relu(x, channels, kernel, f"{prefix}.conv_{i}", f"{prefix}.syncbn_fc_{i}",
                          f"{prefix}.relu_{i}")
        if kind == "pup" and i < 3:
            x = Interpolate(_scaled(x, 2), name=f"{prefix}.up_{i}")(x)
        elif kind == "aux_pup":
            x = Interpolate(_scaled(x, 4), name=f"{prefix}.up_{i}")(x)
    x = _conv(num_classes, 1, f"{prefix}.conv_{stages}")(x)
    size = _scaled(x, 2) if kind == "pup" else out_size
    return Interpolate(size, name=f"{prefix}.up_out")(x)


def mla_neck(maps, channels):
    """``VIT_MLA``'s norms and ``Conv_MLA``: LayerNorm each level, 1x1 conv -> BN -> ReLU,
    a top-down running sum from the deepest level, 3x3 conv -> BN -> ReLU. Returns the
    levels shallow to deep (the official p2 ... p5)."""
    levels = (2, 3, 4, 5)
    lateral = {}
    for i, (level, fmap) in enumerate(zip(levels, maps)):
        x = layer_norm(1e-6, name=f"backbone.norm_{i}")(fmap)
        p = f"backbone.mla.mla_p{level}_1x1"
        lateral[level] = _conv_bn_relu(x, channels, 1, f"{p}.0", f"{p}.1", f"{p}.2", bias=False)
    summed, outs = None, {}
    for level in reversed(levels):
        summed = lateral[level] if summed is None else keras.layers.Add(
            name=f"backbone.mla.mla_p{level}_plus")([summed, lateral[level]])
        p = f"backbone.mla.mla_p{level}"
        outs[level] = _conv_bn_relu(summed, channels, 3, f"{p}.0", f"{p}.1", f"{p}.2", bias=False)
    return [outs[level] for level in levels]


def mla_head(levels, num_classes, out_size, channels=128):
    """``VIT_MLAHead``: per level two 3x3 conv -> BN -> ReLU (no conv bias), 4x upsampling
    with align_corners=True, concatenated p2 ... p5, 3x3 conv to the classes, resized to
    ``out_size``."""
    heads = []
    for level, x in zip((2, 3, 4, 5), levels):
        p = f"decode_head.mlahead.head{level}"
        x = _conv_bn_relu(x, channels, 3, f"{p}.0", f"{p}.1", f"{p}.2", bias=False)
        x = _conv_bn_relu(x, channels, 3, f"{p}.3", f"{p}.4", f"{p}.5", bias=False)
        heads.append(Interpolate(_scaled(x, 4), align_corners=True, name=f"{p}.up")(x))
    x = keras.layers.Concatenate(name="decode_head.mlahead.concat")(heads)
    x = _conv(num_classes, 3, "decode_head.cls")(x)
    return Interpolate(out_size, name="decode_head.up_out")(x)


def setr(*, decoder="pup", img_size=512, patch_size=16, in_chans=3, num_classes=150,
         embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0,
         attn_drop_rate=0.0, drop_path_rate=0.0, main_index=None, aux_indices=(9, 14, 19),
         mla_indices=(5, 11, 17, 23), head_channels=256, mla_channels=256,
         mlahead_channels=128, aux_heads=False, name="setr"):
    """Builds SETR with the ``decoder`` "naive", "pup" or "mla" as a functional model:
    images (B, H, W, in_chans) -> logits (B, H', W', num_classes), H' x W' the input size
    for naive and MLA, 16x the token grid for PUP (the input size at patch 16).

    main_index: the block the naive / PUP head reads (default the last). aux_indices: the
    blocks of the auxiliary heads (naive / PUP); mla_indices: the four blocks MLA
    aggregates (its auxiliary heads read the four MLA maps). head_channels: the naive / PUP
    heads' width (256 in the official code, fixed there); mla_channels / mlahead_channels:
    the MLA neck's and head's. aux_heads=True: the training model, outputs [main, aux...]
    (the official loss weights: main 1.0, every auxiliary head 0.4).
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    h, w = check_img_size(img_size, patch_size)
    check_in_chans(in_chans)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    main_index = depth - 1 if main_index is None else main_index
    if decoder == "mla":
        if len(mla_indices) != 4:
            raise ValueError(f"MLA aggregates four blocks, got mla_indices={mla_indices!r}")
        indices = tuple(mla_indices)
    else:
        indices = (main_index,) + tuple(aux_indices if aux_heads else ())
    for i in indices:
        if not 0 <= i < depth:
            raise ValueError(f"block index {i} is out of range for depth {depth} (0 ... {depth - 1})")
    if decoder == "mla" and list(indices) != sorted(set(indices)):
        raise ValueError(f"mla_indices must be increasing, got {mla_indices!r}")

    grid = (h // patch_size, w // patch_size)
    inputs = keras.Input((h, w, in_chans), name="images")
    x = PatchEmbed(patch_size, embed_dim, name="backbone.patch_embed")(inputs)
    x = PrefixTokens(("cls_token",), stddev=0.02, name="backbone.prefix_tokens")(x)
    x = PositionEmbedding(grid, 1, name="backbone.pos_embed")(x)
    num_prefix = 1
    if decoder == "mla":  # VIT_MLA: x[:, 1:] right after the position embedding
        x = TokensToMap(grid, 1, name="backbone.drop_cls_token")(x)
        x = keras.layers.Reshape((grid[0] * grid[1], embed_dim), name="backbone.tokens")(x)
        num_prefix = 0
    x = keras.layers.Dropout(drop_rate, name="backbone.pos_drop")(x)

    def block(i, drop_path):
        return TransformerBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                drop=drop_rate, attn_drop=attn_drop_rate, drop_path=drop_path,
                                norm_eps=1e-6, name=f"backbone.blocks.{i}")

    # Blocks after the last one a head reads fall out of the functional graph.
    used = sorted(set(indices))
    _, maps = transformer_blocks(x, block, depth, drop_path_rate, grid=grid,
                                 num_prefix_tokens=num_prefix, features_only=True,
                                 out_indices=used)
    fmap = dict(zip(used, maps))
    if decoder == "mla":
        levels = mla_neck([fmap[i] for i in indices], mla_channels)
        outputs = [mla_head(levels, num_classes, (h, w), mlahead_channels)]
        if aux_heads:
            for k, level in enumerate(levels):
                y = _conv(num_classes, 1, f"auxiliary_head.{k}.aux", bias=False)(level)
                outputs.append(Interpolate((h, w), name=f"auxiliary_head.{k}.up_out")(y))
    else:
        outputs = [up_head(fmap[main_index], "decode_head", num_classes, (h, w), kind=decoder,
                           channels=head_channels)]
        if aux_heads:
            kind = "naive" if decoder == "naive" else "aux_pup"
            outputs += [up_head(fmap[i], f"auxiliary_head.{k}", num_classes, (h, w), kind=kind,
                                channels=head_channels) for k, i in enumerate(aux_indices)]
    return keras.Model(inputs, outputs if aux_heads else outputs[0], name=name)


_ENCODERS = {
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "deit_small": dict(embed_dim=384, depth=12, num_heads=6),
}
# Block indices of the official configs: ViT-L as SETR_{Naive,PUP,MLA}_512x512_160k_ade20k;
# 12 blocks as SETR_Naive_Base / SETR_PUP_DeiT / SETR_MLA_DeiT (768x768 Cityscapes).
_HEADS = {
    24: {"naive": dict(aux_indices=(9, 14, 19)), "pup": dict(aux_indices=(9, 14, 19, 23)),
         "mla": dict(mla_indices=(5, 11, 17, 23))},
    12: {"naive": dict(aux_indices=(2, 5, 8)), "pup": dict(aux_indices=(4, 7, 9, 11)),
         "mla": dict(mla_indices=(2, 5, 8, 11))},
}
# ADE20K as the official configs: 512 x 512 crops, 150 classes, mmseg's ImageNet mean/std.
_CFG = dict(task="segmentation", input_size=512, num_classes=150, mean=IMAGENET_MEAN,
            std=IMAGENET_STD, interpolation="bilinear", crop_pct=1.0)

for _arch, _encoder in _ENCODERS.items():
    for _decoder in DECODERS:
        register_variant(f"setr_{_decoder}_{_arch}", setr, __name__, _CFG, decoder=_decoder,
                         img_size=512, patch_size=16, num_classes=150, **_encoder,
                         **_HEADS[_encoder["depth"]][_decoder])
