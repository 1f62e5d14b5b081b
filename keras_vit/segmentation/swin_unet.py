"""Swin-UNet (Cao et al. 2021, "Swin-Unet: Unet-like Pure Transformer for Medical Image
Segmentation"): a U-shaped network of Swin blocks.

Encoder: 4x4 patch embedding, stages of Swin blocks each followed (but the last) by patch
merging; a LayerNorm on the bottleneck. Decoder: patch expanding (Linear dim -> 2 dim, then
2x2 depth-to-space: twice the resolution, half the channels, LayerNorm), a skip connection
per stage (the encoder stage's input concatenated, then Linear 2 dim -> dim,
``concat_back_dim``), the same number of Swin blocks as the mirrored encoder stage;
``norm_up``, a final 4x patch expanding (``up``: Linear dim -> 16 dim, 4x4 depth-to-space,
LayerNorm) and a 1x1 convolution (``output``) give logits at the input resolution.

Follows ``networks/swin_transformer_unet_skip_expand_decoder_sys.py`` (``SwinTransformerSys``)
of HuCaoFighting/Swin-Unet and its ``configs/swin_tiny_patch4_window7_224_lite.yaml``; layer
names are its module paths, so its state dicts load by name (with or without the
``swin_unet.`` prefix of its ``SwinUnet`` wrapper: ``keras_vit.convert.swin_unet``). The Swin
blocks and patch merging are the Swin family's (``keras_vit.models.swin``).
"""

import keras
from keras import ops

from keras_vit.layers import PatchEmbed, dense
from keras_vit.layers.common import layer_norm
from keras_vit.layers.embedding import to_2tuple
from keras_vit.layers.window import SwinTransformerBlock
from keras_vit.models.common import check_img_size, check_in_chans, drop_path_rates
from keras_vit.models.swin import NORM_EPS, PatchMerging, stage_resolutions
from keras_vit.registry import register_variant


def depth_to_space(x, scale):
    """einops' ``b h w (p1 p2 c) -> b (h p1) (w p2) c`` (p1 = p2 = scale) on a (B, H, W, C)
    map, with reshapes and one transpose of 4-D tensors (builtin TFLite)."""
    _, h, w, c = x.shape
    out = c // (scale * scale)
    x = ops.reshape(x, (-1, w, scale, scale * out))   # (B*H, W, p1, p2*c)
    x = ops.transpose(x, (0, 2, 1, 3))                # (B*H, p1, W, p2*c)
    return ops.reshape(x, (-1, h * scale, w * scale, out))


@keras.saving.register_keras_serializable(package="keras_vit")
class PatchExpand(keras.layers.Layer):
    """Linear ``expand`` to scale^2 * out_dim channels (no bias), depth-to-space by ``scale``,
    LayerNorm ``norm``: (B, H, W, C) -> (B, scale H, scale W, out_dim).

    The official ``PatchExpand`` is scale 2, out_dim C / 2 (expand C -> 2C);
    ``FinalPatchExpand_X4`` is scale 4, out_dim C (expand C -> 16C).
    """

    def __init__(self, scale, out_dim, norm_eps=NORM_EPS, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.out_dim, self.norm_eps = int(scale), int(out_dim), float(norm_eps)
        self.expand = dense(self.scale ** 2 * self.out_dim, use_bias=False, name="expand")
        self.norm = layer_norm(self.norm_eps, name="norm")

    def build(self, input_shape):
        self.expand.build((None, None, None, input_shape[-1]))
        self.norm.build((None, None, None, self.out_dim))

    def call(self, x):
        return self.norm(depth_to_space(self.expand(x), self.scale))

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        up = lambda s: None if s is None else s * self.scale  # noqa: E731
        return (b, up(h), up(w), self.out_dim)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "out_dim": self.out_dim,
                "norm_eps": self.norm_eps}


def window_and_shift(resolution, window_size, shifted):
    """The official block's rule: a window not smaller than the map's shorter side is that
    side (square) and unshifted; else the window, shifted by half of it every second block.

    (The official code takes square inputs only, where this equals timm's per-axis rule of
    ``models.swin``; a side that is not a multiple of the window is zero-padded inside the
    block, as timm does, where the official code cannot run.)
    """
    shortest = min(resolution)
    if shortest <= window_size:
        return (shortest, shortest), (0, 0)
    shift = window_size // 2 if shifted else 0
    return (window_size, window_size), (shift, shift)


def swin_unet(*, img_size=224, patch_size=4, in_chans=3, num_classes=9, embed_dim=96,
              depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
              qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1,
              name="swin_unet"):
    """Builds Swin-UNet (the official ``SwinTransformerSys``, ``final_upsample="expand_first"``)
    as a functional model: images (B, H, W, in_chans) -> logits (B, H, W, num_classes).

    img_size: int or (h, w), a multiple of patch_size * 2 ** (stages - 1) (32 for four
    stages: every patch merging halves an even map, so each decoder stage meets its skip
    at the same size), otherwise a ValueError naming the valid neighbours. The official code
    runs square sizes whose stage maps are multiples of the window (or not larger than it);
    other sizes follow ``window_and_shift``. depths: the encoder's blocks per stage; the
    decoder stage mirroring stage i has depths[i] blocks too, as in the official code (its
    ``depths_decoder`` / the config's DECODER_DEPTHS are never used). Stochastic depth
    rises linearly over the encoder's blocks (drop_path_rate, the official default 0.1; the
    config's 0.2 in the registered variant) and each decoder stage reuses its mirrored
    encoder stage's rates. Not offered: the official ``ape`` (absolute position embedding,
    off in every config), ``qk_scale`` (None) and ``patch_norm=False``. The official
    ``SwinUnet`` wrapper repeats a one-channel input to three channels; here the caller
    does (in_chans is the patch embedding's).
    """
    num_stages = len(depths)
    if num_stages < 2:
        raise ValueError(f"Swin-UNet needs at least two stages, got depths {depths}")
    if len(num_heads) != num_stages:
        raise ValueError(f"num_heads {num_heads} needs one entry per stage of depths {depths}")
    divisor = patch_size * 2 ** (num_stages - 1)
    what = f"Swin-UNet's size divisor (patch {patch_size} x 2^{num_stages - 1})"
    h, w = check_img_size(img_size, divisor, what=what)
    check_in_chans(in_chans)
    window_size = int(window_size)
    dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]
    resolutions = stage_resolutions((h // patch_size, w // patch_size), num_stages)
    dpr = drop_path_rates(drop_path_rate, sum(depths))
    first_block = [sum(depths[:i]) for i in range(num_stages)]

    def swin_stage(x, stage, prefix):
        for j in range(depths[stage]):
            window, shift = window_and_shift(resolutions[stage], window_size, j % 2 == 1)
            x = SwinTransformerBlock(dims[stage], num_heads[stage], window, shift,
                                     mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                                     attn_drop=attn_drop_rate,
                                     drop_path=dpr[first_block[stage] + j], norm_eps=NORM_EPS,
                                     name=f"{prefix}.blocks.{j}")(x)
        return x

    inputs = keras.Input((h, w, in_chans), name="images")
    x = PatchEmbed(to_2tuple(patch_size), dims[0], norm=True, flatten=False, norm_eps=NORM_EPS,
                   name="patch_embed")(inputs)
    x = keras.layers.Dropout(drop_rate, name="pos_drop")(x)
    skips = []  # each encoder stage's input (the official x_downsample)
    for i in range(num_stages):
        skips.append(x)
        x = swin_stage(x, i, f"layers.{i}")
        if i < num_stages - 1:
            x = PatchMerging(name=f"layers.{i}.downsample")(x)
    x = layer_norm(NORM_EPS, name="norm")(x)

    # Decoder stage k mirrors encoder stage num_stages - 1 - k.
    x = PatchExpand(2, dims[-1] // 2, name="layers_up.0")(x)
    for k in range(1, num_stages):
        stage = num_stages - 1 - k
        x = keras.layers.Concatenate(name=f"skip_concat.{k}")([x, skips[stage]])
        x = dense(dims[stage], name=f"concat_back_dim.{k}")(x)
        x = swin_stage(x, stage, f"layers_up.{k}")
        if k < num_stages - 1:
            x = PatchExpand(2, dims[stage] // 2, name=f"layers_up.{k}.upsample")(x)
    x = layer_norm(NORM_EPS, name="norm_up")(x)
    x = PatchExpand(patch_size, dims[0], name="up")(x)  # FinalPatchExpand_X4
    logits = keras.layers.Conv2D(num_classes, 1, use_bias=False, name="output")(x)
    return keras.Model(inputs, logits, name=name)


# Synapse (the official experiments): CT slices already scaled to [0, 1] by the TransUNet
# preprocessing the official data loader reads, no mean / std; 8 organs + background.
register_variant("swin_unet_tiny_224", swin_unet, __name__,
                 dict(task="segmentation", input_size=224, num_classes=9, mean=(0.0, 0.0, 0.0),
                      std=(1.0, 1.0, 1.0), interpolation="bicubic", crop_pct=1.0),
                 img_size=224, patch_size=4, num_classes=9, embed_dim=96, depths=(2, 2, 2, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2)
