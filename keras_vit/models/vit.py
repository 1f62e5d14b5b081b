"""Vision Transformer (Dosovitskiy et al. 2021): patches -> linear projection, [CLS], learned
position embedding, a stack of Pre-LN transformer blocks, a linear head.

Names, hyperparameters and outputs match timm's ``vision_transformer.py``.
"""

import keras

from keras_vit.layers import (
    PatchEmbed,
    PositionEmbedding,
    PrefixTokens,
    TokenPool,
    TokensToMap,
    TransformerBlock,
    dense,
    layer_norm,
)
from keras_vit.models.common import (
    check_img_size,
    check_in_chans,
    drop_path_rates,
    resolve_out_indices,
)
from keras_vit.registry import INCEPTION_MEAN, INCEPTION_STD, register_variant


def vision_transformer(*, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                       embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True,
                       class_token=True, global_pool="token", representation_size=None,
                       distilled=False, distilled_training=False, drop_rate=0.0,
                       attn_drop_rate=0.0, drop_path_rate=0.0, init_values=None,
                       fc_norm=None, norm_first=True, features_only=False, out_indices=None,
                       name="vit"):
    """Builds a ViT (or, with ``distilled=True``, a distilled DeiT) as a functional model.

    global_pool: "token" ([CLS] then final norm, ViT) or "avg" (mean of patch
    tokens); fc_norm (timm's): normalise after pooling instead of before,
    default True for "avg". representation_size: the
    original paper's tanh pre-logits layer, off by default. distilled: adds
    DeiT's distillation token and ``head_dist``; the output is the mean of the
    two heads unless ``distilled_training`` (then [cls_logits, dist_logits]).
    features_only: the token maps of ``out_indices`` blocks as (B, H/p, W/p, D).
    """
    h, w = check_img_size(img_size, patch_size)
    check_in_chans(in_chans)
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
    if global_pool == "token" and not class_token:
        raise ValueError("global_pool='token' needs class_token=True")
    if distilled and (global_pool != "token" or representation_size):
        raise ValueError("distilled models pool the class and distillation tokens; use "
                         "global_pool='token' and no representation layer")
    grid = (h // patch_size, w // patch_size)
    token_names = (("cls_token",) if class_token else ()) + (("dist_token",) if distilled else ())
    num_prefix = len(token_names)

    inputs = keras.Input((h, w, in_chans), name="images")
    x = PatchEmbed(patch_size, embed_dim, name="patch_embed")(inputs)
    if token_names:
        x = PrefixTokens(token_names, name="prefix_tokens")(x)
    x = PositionEmbedding(grid, num_prefix, name="pos_embed")(x)
    x = keras.layers.Dropout(drop_rate, name="pos_drop")(x)

    features = []
    indices = set(resolve_out_indices(out_indices, depth)) if features_only else ()
    for i, dpr in enumerate(drop_path_rates(drop_path_rate, depth)):
        x = TransformerBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                             attn_drop=attn_drop_rate, drop_path=dpr, init_values=init_values,
                             norm_first=norm_first, name=f"blocks.{i}")(x)
        if i in indices:
            features.append(TokensToMap(grid, num_prefix, name=f"feature_{i}")(x))
    if features_only:
        return keras.Model(inputs, features, name=name)

    use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
    if norm_first and not use_fc_norm:  # Post-LN blocks end normalised already
        x = layer_norm(name="norm")(x)
    pooled = TokenPool(global_pool, num_prefix, name="pool")(x)
    if use_fc_norm:
        pooled = layer_norm(name="fc_norm")(pooled)
    if representation_size:
        pooled = keras.layers.Dense(representation_size, activation="tanh",
                                    name="pre_logits.fc")(pooled)
    if not num_classes:
        return keras.Model(inputs, pooled, name=name)
    pooled = keras.layers.Dropout(drop_rate, name="head_drop")(pooled)
    logits = dense(num_classes, name="head")(pooled)
    if not distilled:
        return keras.Model(inputs, logits, name=name)
    dist = TokenPool("token", num_prefix, index=1, name="pool_dist")(x)
    dist_logits = dense(num_classes, name="head_dist")(dist)
    if distilled_training:
        return keras.Model(inputs, [logits, dist_logits], name=name)
    return keras.Model(inputs, keras.layers.Average(name="head_average")([logits, dist_logits]),
                       name=name)


def distilled_inference_model(model):
    """The averaged-heads model that shares the weights of a ``distilled_training`` model."""
    if len(model.outputs) != 2:
        raise ValueError("expected a distilled model built with distilled_training=True")
    avg = keras.layers.Average(name="head_average")(list(model.outputs))
    return keras.Model(model.input, avg, name=model.name)


def _vit(name, img_size=224, **defaults):
    """Registers a timm-named ViT variant."""
    cfg = dict(input_size=img_size, mean=INCEPTION_MEAN, std=INCEPTION_STD,
               crop_pct=1.0 if img_size >= 384 else 0.9)
    return register_variant(name, vision_transformer, __name__, cfg, img_size=img_size, **defaults)


TINY = dict(embed_dim=192, depth=12, num_heads=3)
SMALL = dict(embed_dim=384, depth=12, num_heads=6)
BASE = dict(embed_dim=768, depth=12, num_heads=12)
LARGE = dict(embed_dim=1024, depth=24, num_heads=16)
HUGE = dict(embed_dim=1280, depth=32, num_heads=16)

# The original ViT paper and the AugReg release ("How to train your ViT"), exactly the
# variants timm registers for them.
_vit("vit_tiny_patch16_224", patch_size=16, **TINY)
_vit("vit_tiny_patch16_384", img_size=384, patch_size=16, **TINY)
for _size, _arch in (("small", SMALL), ("base", BASE), ("large", LARGE)):
    for _patch in (16, 32):
        for _img in (224, 384):
            _extra = {"num_classes": 0} if (_size, _patch, _img) == ("large", 32, 224) else {}
            _vit(f"vit_{_size}_patch{_patch}_{_img}", img_size=_img, patch_size=_patch,
                 **_arch, **_extra)
# timm ships these as ImageNet-21k checkpoints, so their default head is timm's too.
_vit("vit_huge_patch14_224", patch_size=14, num_classes=0, **HUGE)
_vit("vit_base_patch16_224_miil", patch_size=16, qkv_bias=False, num_classes=11221, **BASE)
_vit("vit_base_patch16_gap_224", patch_size=16, embed_dim=768, depth=12, num_heads=16,
     class_token=False, global_pool="avg", fc_norm=False)
