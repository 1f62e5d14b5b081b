"""SegFormer (Xie et al. 2021): a Mix Transformer (MiT) encoder and an all-MLP decoder.

MiT is PVT v2's pyramid (``keras_vit/models/pvt.py``): overlapping patch
embeddings (7x7 stride 4, then 3x3 stride 2), efficient self-attention whose
keys and values come from a map reduced by a strided conv (sr_ratio 8, 4, 2, 1),
a Mix-FFN with a 3x3 depthwise conv in place of a position embedding, and a
LayerNorm after each stage. The decoder projects each stage's map to
``decoder_dim`` with a Linear, upsamples the three coarser ones to H/4
(bilinear, torch's ``align_corners=False``), concatenates them in reverse stage
order, fuses them with a 1x1 conv + BatchNorm + ReLU, then dropout and a 1x1
classifier. The output is the logits NHWC at H/4 x W/4, as the official head
and Hugging Face's ``SegformerForSemanticSegmentation`` give them (the official
test pipeline then resizes them to the image; ``keras_vit.segmentation.predict_masks``
does).

Layer names are the official checkpoints' module paths (NVlabs/SegFormer, mmseg
``EncoderDecoder``: ``backbone.patch_embed1.proj``, ``backbone.block1.0.attn.kv``,
``backbone.norm1``, ``decode_head.linear_c4.proj``, ``decode_head.linear_fuse.conv``,
``decode_head.linear_fuse.bn``, ``decode_head.linear_pred``); Hugging Face
checkpoints load through a state-dict adapter (``keras_vit/convert/segformer.py``).

LayerNorm eps: the official blocks and stage norms use 1e-6 (``norm_eps``, the
default), the patch-embedding and reduction norms torch's 1e-5; Hugging Face's
model uses 1e-5 everywhere, so ``norm_eps=1e-5`` reproduces its logits exactly.
"""

import keras

from keras_vit.layers import batch_norm, dense, layer_norm
from keras_vit.models.pvt import (
    PvtBlock,
    check_pyramid,
    overlap_embed_stage,
    pyramid_stages,
    stage_map,
)
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant


@keras.saving.register_keras_serializable(package="keras_vit")
class MixTransformerBlock(PvtBlock):
    """MiT's block, which is PVT v2's (``dwconv=True``): its own type only because the
    official checkpoint nests the Mix-FFN's depthwise conv one module deeper
    (``mlp.dwconv.dwconv``, its ``DWConv`` wrapper), which its converter says."""

    def __init__(self, dim, num_heads, grid_size, **kwargs):
        kwargs["dwconv"] = True
        super().__init__(dim, num_heads, grid_size, **kwargs)


def all_mlp_decoder(features, decoder_dim, num_classes, dropout):
    """The official ``SegFormerHead`` on the stage maps (B, H/s, W/s, C_s), s = 4 ... 32:
    logits (B, H/4, W/4, num_classes)."""
    size = tuple(features[0].shape[1:3])
    projected = []
    for k in reversed(range(len(features))):  # c4, c3, c2, c1: the official concat order
        x = dense(decoder_dim, name=f"decode_head.linear_c{k + 1}.proj")(features[k])
        if k:
            # Keras' bilinear resize uses half-pixel centres: F.interpolate(align_corners=False).
            x = keras.layers.Resizing(*size, interpolation="bilinear",
                                      name=f"decode_head.resize_c{k + 1}")(x)
        projected.append(x)
    x = keras.layers.Concatenate(name="decode_head.concat")(projected)
    # mmcv's ConvModule: conv (no bias: a norm follows), SyncBN ("bn"), ReLU ("activate").
    x = keras.layers.Conv2D(decoder_dim, 1, use_bias=False, kernel_initializer="he_normal",
                            name="decode_head.linear_fuse.conv")(x)
    x = batch_norm(name="decode_head.linear_fuse.bn")(x)
    x = keras.layers.ReLU(name="decode_head.linear_fuse.activate")(x)
    # The official head's Dropout2d (whole channels); Hugging Face's drops elements.
    x = keras.layers.SpatialDropout2D(dropout, name="decode_head.dropout")(x)
    return keras.layers.Conv2D(num_classes, 1, name="decode_head.linear_pred")(x)


def segformer(*, img_size=512, in_chans=3, num_classes=150, embed_dims=(32, 64, 160, 256),
              num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4), depths=(2, 2, 2, 2),
              sr_ratios=(8, 4, 2, 1), qkv_bias=True, decoder_dim=256, norm_eps=1e-6,
              drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, decoder_dropout=0.1,
              name="segformer"):
    """Builds SegFormer (official ``mit_bX`` backbone + ``SegFormerHead``) as a functional
    model: images (B, H, W, in_chans) -> logits (B, H/4, W/4, num_classes).

    Four stages of strides 4, 8, 16, 32, so sizes are multiples of 32 with every
    stage grid at least its sr_ratio. ``drop_rate`` is the encoder's dropout,
    ``decoder_dropout`` the head's (0.1 in every official config); ``norm_eps``
    the blocks' and stage norms' LayerNorm eps (official 1e-6, Hugging Face 1e-5).
    """
    if len(depths) != 4:
        raise ValueError(f"SegFormer's MiT has four stages; depths needs four values, got "
                         f"{depths!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(decoder_dim, int) or decoder_dim < 1:
        raise ValueError(f"decoder_dim must be a positive int, got {decoder_dim!r}")
    size, grids, embed_dims, num_heads, mlp_ratios, sr_ratios = check_pyramid(
        img_size, in_chans, 4, embed_dims, num_heads, mlp_ratios, sr_ratios, depths)
    inputs, stages, _, dpr = pyramid_stages(size, in_chans, depths, drop_path_rate,
                                            features_only=False, out_indices=None)
    x, features = inputs, []
    for k in stages:
        x = overlap_embed_stage(x, k, embed_dims[k], name=f"backbone.patch_embed{k + 1}")
        for i in range(depths[k]):
            x = MixTransformerBlock(embed_dims[k], num_heads[k], grids[k],
                                    mlp_ratio=mlp_ratios[k], sr_ratio=sr_ratios[k],
                                    qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                                    drop_path=next(dpr), norm_eps=norm_eps,
                                    name=f"backbone.block{k + 1}.{i}")(x)
        x = layer_norm(norm_eps, name=f"backbone.norm{k + 1}")(x)
        x = stage_map(x, k, grids, stages, features, name=f"backbone.stage{k + 1}_map")
    logits = all_mlp_decoder(features, decoder_dim, num_classes, decoder_dropout)
    return keras.Model(inputs, logits, name=name)


# The official ADE20K configs (local_configs/segformer/B*/segformer.b*.512x512.ade.160k.py;
# B5's is 640x640): 150 classes, ImageNet mean/std (img_norm_cfg 123.675 ... / 255); the
# test pipeline resizes images to multiples of 32 (AlignedResize, size_divisor=32).
_CFG = dict(task="segmentation", input_size=512, num_classes=150, mean=IMAGENET_MEAN,
            std=IMAGENET_STD, interpolation="bilinear", crop_pct=1.0)
# mit_b1 ... mit_b5 (mix_transformer.py); every official backbone fixes drop_path_rate 0.1.
MIT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4),
           sr_ratios=(8, 4, 2, 1), drop_path_rate=0.1)
for _name, _extra in (
        ("segformer_b0", dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2),
                              decoder_dim=256)),
        ("segformer_b1", dict(depths=(2, 2, 2, 2), decoder_dim=256)),
        ("segformer_b2", dict(depths=(3, 4, 6, 3), decoder_dim=768)),
        ("segformer_b3", dict(depths=(3, 4, 18, 3), decoder_dim=768)),
        ("segformer_b4", dict(depths=(3, 8, 27, 3), decoder_dim=768)),
        ("segformer_b5", dict(depths=(3, 6, 40, 3), decoder_dim=768, img_size=640))):
    _cfg = dict(_CFG, input_size=_extra.get("img_size", 512))
    register_variant(_name, segformer, __name__, _cfg, **{**MIT, **_extra})
