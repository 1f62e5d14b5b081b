"""ViT with a convolutional stem (Xiao et al. 2021, "Early Convolutions Help Transformers See
Better"): the paper's ViT_C models.

The stride-16 16x16 patchify convolution is replaced by a stack of 3x3
convolutions (BatchNorm + ReLU, no bias) -- stride 2 where the width doubles,
stride 1 where it stays -- and a final 1x1 convolution (with bias) to the
embedding width; the transformer has one block fewer than the patchify
model of the same budget, so flops stay matched. The rest is ViT:
[CLS] token, learned position embedding, Pre-LN blocks, final LayerNorm, a
linear head on the [CLS] token.

Configurations as the paper's Table 1 and the official code
(facebookresearch/pycls ``pycls/models/vit.py``: ``ViTStemConv``, LayerNorm
eps 1e-5, BatchNorm eps 1e-5 / momentum 0.1):

  model       stem widths                    d     blocks  heads  MLP  params (paper)
  vit_c_1gf   24, 48, 96, 192                192   11      3      3x   4.6M
  vit_c_4gf   48, 96, 192, 384               384   11      6      3x   17.8M
  vit_c_18gf  64, 128, 128, 256, 256, 512    768   11      12     4x   81.6M
  vit_c_36gf  64, 128, 128, 256, 256, 512    1024  13      16     4x   167.8M

timm (1.0.31) has no conv-stem ViT of this kind, and pycls released no
ViT_C weights, so the variants are checked by parameter count. Layer names
follow timm's ViT (``blocks.i.attn.qkv``, ``cls_token``, ``pos_embed``,
``norm``, ``head``); the stem is ``stem.i.conv`` / ``stem.i.bn`` and
``stem.proj``.
"""

import math

import keras

from keras_vit.layers import batch_norm
from keras_vit.models.common import check_img_size, check_in_chans
from keras_vit.models.vit import vit_on_tokens
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant


def conv_stem_strides(stem_chs):
    """The paper's rule: stride 2 for the first conv and wherever the width grows, else 1."""
    return tuple(2 if i == 0 or c > stem_chs[i - 1] else 1 for i, c in enumerate(stem_chs))


def conv_stem(x, stem_chs, strides, embed_dim, name="stem"):
    """3x3 conv-BN-ReLU stack, then a 1x1 conv (bias) to ``embed_dim``: (B, H, W, C) ->
    (B, H/s, W/s, embed_dim) with s the product of the strides."""
    for i, (c, s) in enumerate(zip(stem_chs, strides)):
        # torch pads 3x3 convs by 1 on every side; explicit, so stride 2 matches it.
        x = keras.layers.ZeroPadding2D(1, name=f"{name}.{i}.pad")(x)
        x = keras.layers.Conv2D(c, 3, strides=s, padding="valid", use_bias=False,
                                name=f"{name}.{i}.conv")(x)
        x = batch_norm(f"{name}.{i}.bn")(x)
        x = keras.layers.Activation("relu", name=f"{name}.{i}.act")(x)
    # pycls initialises the last 1x1 conv with N(0, sqrt(2 / out_channels)).
    init = keras.initializers.RandomNormal(stddev=math.sqrt(2.0 / embed_dim))
    return keras.layers.Conv2D(embed_dim, 1, kernel_initializer=init, name=f"{name}.proj")(x)


def vit_conv_stem(*, img_size=224, in_chans=3, num_classes=1000, stem_chs=(24, 48, 96, 192),
                  stem_strides=None, embed_dim=192, depth=11, num_heads=3, mlp_ratio=3.0,
                  qkv_bias=True, norm_eps=1e-5, drop_rate=0.0, attn_drop_rate=0.0,
                  drop_path_rate=0.0, features_only=False, out_indices=None, attention="dense",
                  attention_args=None, layer_drop=0.0, name="vit_c"):
    """Builds a ViT_C as a functional model.

    stem_chs: widths of the 3x3 convs; stem_strides: their strides (default
    ``conv_stem_strides(stem_chs)``); the token grid is the image divided by
    their product (16 for every paper model). features_only: the token maps
    of the ``out_indices`` blocks as (B, H/16, W/16, D). attention, attention_args,
    layer_drop: the token mixer and LayerDrop of ``vision_transformer``.
    """
    stem_chs = tuple(int(c) for c in stem_chs)
    strides = tuple(int(s) for s in stem_strides) if stem_strides else conv_stem_strides(stem_chs)
    if len(strides) != len(stem_chs) or any(s not in (1, 2) for s in strides):
        raise ValueError(f"stem_strides {strides} must give 1 or 2 for each of {len(stem_chs)} "
                         "stem convs")
    patch = math.prod(strides)
    h, w = check_img_size(img_size, patch, what="the conv stem's stride")
    check_in_chans(in_chans)
    grid = (h // patch, w // patch)

    inputs = keras.Input((h, w, in_chans), name="images")
    x = conv_stem(inputs, stem_chs, strides, embed_dim)
    x = keras.layers.Reshape((grid[0] * grid[1], embed_dim), name="stem.flatten")(x)
    # pycls: a zero-initialised class token, torch's LayerNorm eps everywhere.
    return vit_on_tokens(inputs, x, grid, num_classes=num_classes, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                         drop_path_rate=drop_path_rate, norm_eps=norm_eps, token_std=0.0,
                         features_only=features_only, out_indices=out_indices,
                         attention=attention, attention_args=attention_args,
                         layer_drop=layer_drop, name=name)


def _vit_c(name, **defaults):
    # pycls evaluates at 224 px cropped from 256 (0.875), bilinear resizing, ImageNet statistics.
    cfg = dict(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875,
               interpolation="bilinear")
    return register_variant(name, vit_conv_stem, __name__, cfg, img_size=224, **defaults)


_STEM_LARGE = (64, 128, 128, 256, 256, 512)
_vit_c("vit_c_1gf", stem_chs=(24, 48, 96, 192), embed_dim=192, depth=11, num_heads=3,
       mlp_ratio=3.0)
_vit_c("vit_c_4gf", stem_chs=(48, 96, 192, 384), embed_dim=384, depth=11, num_heads=6,
       mlp_ratio=3.0)
_vit_c("vit_c_18gf", stem_chs=_STEM_LARGE, embed_dim=768, depth=11, num_heads=12, mlp_ratio=4.0)
_vit_c("vit_c_36gf", stem_chs=_STEM_LARGE, embed_dim=1024, depth=13, num_heads=16,
       mlp_ratio=4.0)


def pycls_vit_to_timm(state_dict):
    """The official pycls ``ViT`` state dict (conv stem) -> the timm-style names of this model.

    pycls keeps torch's ``nn.MultiheadAttention`` (fused ``in_proj`` q, k, v,
    head-major, as timm's ``qkv``), a sequence-first position embedding
    (N, 1, D) and the class token; load the result with ``load_timm_weights``.
    """
    renames = (("stem.cstem_last_conv.", "stem.proj."), ("encoder.ln.", "norm."),
               ("head.head_fc.", "head."), (".self_attention.block.in_proj_", ".attn.qkv."),
               (".self_attention.block.out_proj.", ".attn.proj."), (".ln_1.", ".norm1."),
               (".ln_2.", ".norm2."), (".mlp_block.linear_1.", ".mlp.fc1."),
               (".mlp_block.linear_2.", ".mlp.fc2."))
    out = {}
    for key, value in state_dict.items():
        if key == "class_token":
            out["cls_token"] = value
            continue
        if key == "pos_embedding":  # (N, 1, D) -> (1, N, D)
            out["pos_embed"] = value.reshape(1, value.shape[0], value.shape[-1])
            continue
        new = key
        if new.startswith("stem.cstem") and not new.startswith("stem.cstem_last"):
            # stem.cstem{i}_conv.weight -> stem.{i}.conv.weight, cstem{i}_bn -> stem.{i}.bn
            layer, rest = new[len("stem.cstem"):].split(".", 1)
            index, kind = layer.split("_")
            new = f"stem.{index}.{kind}.{rest}"
        if new.startswith("encoder.block_"):
            new = "blocks." + new[len("encoder.block_"):]
        for old, repl in renames:
            new = new.replace(old, repl) if old.startswith(".") else \
                (repl + new[len(old):] if new.startswith(old) else new)
        out[new] = value
    return out
