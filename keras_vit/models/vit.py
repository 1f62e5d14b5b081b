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
    TransformerBlock,
    layer_norm,
)
from keras_vit.models.common import (
    check_img_size,
    check_in_chans,
    classifier_model,
    transformer_blocks,
)
from keras_vit.registry import INCEPTION_MEAN, INCEPTION_STD, register_variant


def vision_transformer(*, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                       embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True,
                       class_token=True, global_pool="token", representation_size=None,
                       distilled=False, distilled_training=False, drop_rate=0.0,
                       attn_drop_rate=0.0, drop_path_rate=0.0, init_values=None,
                       fc_norm=None, norm_first=True, features_only=False, out_indices=None,
                       attention="dense", attention_args=None, layer_drop=0.0, name="vit"):
    """Builds a ViT (or, with ``distilled=True``, a distilled DeiT) as a functional model.

    global_pool: "token" ([CLS] then final norm, ViT) or "avg" (mean of patch
    tokens); fc_norm (timm's): normalise after pooling instead of before,
    default True for "avg". representation_size: the
    original paper's tanh pre-logits layer, off by default. distilled: adds
    DeiT's distillation token and ``head_dist``; the output is the mean of the
    two heads unless ``distilled_training`` (then [cls_logits, dist_logits]).
    features_only: the token maps of ``out_indices`` blocks as (B, H/p, W/p, D).
    attention: the blocks' token mixer, "dense" (softmax attention), "linear", "topk" or "bigbird"
    (keras_vit/layers/efficient_attention.py), with ``attention_args`` (e.g. {"k": 32}).
    layer_drop: LayerDrop's probability of skipping each whole block in training
    (``keras_vit.compress.keep_blocks`` keeps any subset at inference).
    """
    h, w = check_img_size(img_size, patch_size)
    check_in_chans(in_chans)
    inputs = keras.Input((h, w, in_chans), name="images")
    tokens = PatchEmbed(patch_size, embed_dim, name="patch_embed")(inputs)
    return vit_on_tokens(
        inputs, tokens, (h // patch_size, w // patch_size), num_classes=num_classes,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
        class_token=class_token, global_pool=global_pool,
        representation_size=representation_size, distilled=distilled,
        distilled_training=distilled_training, drop_rate=drop_rate,
        attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, init_values=init_values,
        fc_norm=fc_norm, norm_first=norm_first, features_only=features_only,
        out_indices=out_indices, attention=attention, attention_args=attention_args,
        layer_drop=layer_drop, name=name)


def vit_on_tokens(inputs, tokens, grid, *, num_classes=1000, depth=12, num_heads=12,
                  mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token",
                  representation_size=None, distilled=False, distilled_training=False,
                  drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, init_values=None,
                  fc_norm=None, norm_first=True, norm_eps=1e-6, token_std=1e-6,
                  position_embedding=PositionEmbedding, head_drop=True, features_only=False,
                  out_indices=None, attention="dense", attention_args=None, layer_drop=0.0,
                  name="vit"):
    """The ViT on the (B, gh*gw, D) patch tokens of any stem (ViT's linear patch embedding,
    ViT_C's conv stem, T2T's tokens-to-token module), as a functional model: prefix
    tokens, ``position_embedding`` (a layer class called as ``(grid, num_prefix_tokens,
    name="pos_embed")``), transformer blocks, then the ``features_only`` maps or the head.

    The arguments are ``vision_transformer``'s; besides, what stems' references set
    otherwise: ``norm_eps`` of every LayerNorm, ``token_std`` of the prefix tokens'
    initialisation, and ``head_drop`` (whether dropout precedes the head).
    """
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
    if global_pool == "token" and not class_token:
        raise ValueError("global_pool='token' needs class_token=True")
    if distilled and (global_pool != "token" or representation_size):
        raise ValueError("distilled models pool the class and distillation tokens; use "
                         "global_pool='token' and no representation layer")
    token_names = (("cls_token",) if class_token else ()) + (("dist_token",) if distilled else ())
    num_prefix = len(token_names)

    x = tokens
    if token_names:
        x = PrefixTokens(token_names, stddev=token_std, name="prefix_tokens")(x)
    x = position_embedding(grid, num_prefix, name="pos_embed")(x)
    x = keras.layers.Dropout(drop_rate, name="pos_drop")(x)

    def block(i, drop_path):
        return TransformerBlock(tokens.shape[-1], num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                drop=drop_rate, attn_drop=attn_drop_rate, drop_path=drop_path,
                                init_values=init_values, norm_first=norm_first,
                                norm_eps=norm_eps, attention=attention,
                                attention_args=attention_args, name=f"blocks.{i}")

    x, features = transformer_blocks(x, block, depth, drop_path_rate, grid=grid,
                                     num_prefix_tokens=num_prefix, features_only=features_only,
                                     out_indices=out_indices, layer_drop=layer_drop)
    if features_only:
        return keras.Model(inputs, features, name=name)

    use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
    if norm_first and not use_fc_norm:  # Post-LN blocks end normalised already
        x = layer_norm(norm_eps, name="norm")(x)
    pooled = TokenPool(global_pool, num_prefix, name="pool")(x)
    if use_fc_norm:
        pooled = layer_norm(norm_eps, name="fc_norm")(pooled)
    if representation_size:
        pooled = keras.layers.Dense(representation_size, activation="tanh",
                                    name="pre_logits.fc")(pooled)
    # Headless, a distilled model gives the [CLS] features alone.
    dist = (TokenPool("token", num_prefix, index=1, name="pool_dist")(x)
            if distilled and num_classes else None)
    return classifier_model(inputs, pooled, num_classes, name,
                            drop_rate=drop_rate if head_drop else None, dist=dist,
                            distilled_training=distilled_training)


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
