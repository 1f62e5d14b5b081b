"""DeiT (Touvron et al. 2021): ViT trained data-efficiently; the distilled variants add a
distillation token that learns a CNN teacher's labels, and a second head ``head_dist``.

Architecturally a ViT, so the builder is ``vit.vision_transformer``; at inference
the distilled models average the two heads, as timm's ``VisionTransformerDistilled``.
"""

from keras_vit.models.vit import BASE, SMALL, TINY, vision_transformer
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant


def _deit(name, img_size=224, **defaults):
    cfg = dict(input_size=img_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
               crop_pct=1.0 if img_size >= 384 else 0.875)
    return register_variant(name, vision_transformer, __name__, cfg, img_size=img_size,
                            patch_size=16, **defaults)


for _size, _arch in (("tiny", TINY), ("small", SMALL), ("base", BASE)):
    _deit(f"deit_{_size}_patch16_224", **_arch)
    _deit(f"deit_{_size}_distilled_patch16_224", distilled=True, **_arch)
_deit("deit_base_patch16_384", img_size=384, **BASE)
_deit("deit_base_distilled_patch16_384", img_size=384, distilled=True, **BASE)
