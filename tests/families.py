"""The smallest fast configuration of every model family, for tests that cover them all.

``SMALLEST`` maps a case to a registered model name and the builder kwargs that shrink
it (depth, width, image size) so that it builds in about a second; the configurations
are those the family's own tests use. A case is named after its registry family
(``get_model_config(name)["family"]``), except where one family file holds two
architectures: ``pvt_v2`` is PVT v2 in the ``pvt`` family.

A new family registered without an entry here fails ``test_every_family_has_a_smallest_config``
(tests/test_jax_backend.py): ``missing_families()`` lists it.
"""

import numpy as np

import keras_vit

_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
# 64 px: every stage's spatially reduced keys are more than one token.
_PVT = dict(img_size=64, embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 2, 4),
            mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1), num_classes=5)

SMALLEST = {
    "vit": ("vit_tiny_patch16_224", _VIT),
    # Distilled: the distillation token and the averaged two-head output.
    "deit": ("deit_tiny_distilled_patch16_224", _VIT),
    "vit_conv_stem": ("vit_c_1gf", dict(img_size=32, stem_chs=(8, 16, 16, 32),
                                        stem_strides=(2, 2, 1, 2), embed_dim=32, depth=2,
                                        num_heads=2, mlp_ratio=3.0, num_classes=5)),
    # Two blocks per stage: the second one's shifted windows and attention mask.
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=24, depths=(2, 2),
                                                  num_heads=(1, 2), window_size=4,
                                                  num_classes=5)),
    "pvt": ("pvt_tiny", _PVT),
    "pvt_v2": ("pvt_v2_b0", _PVT),
    # SVT: locally grouped (padded 3x3 windows at 64 px) and global sub-sampled attention.
    "twins": ("twins_svt_small", dict(img_size=64, patch_size=4, embed_dims=(8, 16, 16, 24),
                                      num_heads=(1, 2, 2, 3), mlp_ratios=(2, 2, 2, 2),
                                      depths=(2, 1, 2, 1), sr_ratios=(8, 4, 2, 1),
                                      wss=(3, 3, 3, 3), num_classes=5)),
    "pit": ("pit_ti_224", dict(img_size=32, patch_size=8, stride=4, base_dims=(8, 8, 8),
                               depth=(1, 1, 1), heads=(2, 4, 8), mlp_ratio=2, num_classes=5)),
    "tnt": ("tnt_s_patch16_224", dict(img_size=32, patch_size=16, embed_dim=16, inner_dim=8,
                                      depth=1, num_heads_inner=2, num_heads_outer=2,
                                      mlp_ratio=2, num_classes=5)),
    "xcit": ("xcit_nano_12_p16_224", dict(img_size=32, patch_size=16, embed_dim=32, depth=2,
                                          num_heads=4, num_classes=5)),
    # Performer tokens-to-token (t2t_vit_7); the transformer variant is plain attention.
    "t2t_vit": ("t2t_vit_7", dict(img_size=32, embed_dim=32, depth=2, num_heads=2,
                                  mlp_ratio=3.0, token_dim=8, num_classes=5)),
    # DeepViT-S's CNN embedding, transform_scale and re-attention in the last two blocks.
    "deepvit": ("deepvit_s", dict(img_size=32, patch_size=8, embed_dim=24, depth=3,
                                  num_heads=3, mlp_ratio=3.0, qkv_bias=True, reatten_blocks=2,
                                  num_classes=5)),
    "cmt": ("cmt_ti", dict(img_size=64, embed_dims=(8, 16, 16, 24), stem_channel=8,
                           num_heads=(1, 2, 2, 4), mlp_ratios=(2.0,) * 4, depths=(1, 1, 1, 1),
                           fc_dim=32, num_classes=5)),
    # botnet26t's tiered stem, bottlenecks and self-attention blocks, one stride-2.
    "botnet": ("botnet26t_256", dict(img_size=64, stem="tiered", stem_chs=16, num_classes=5,
                                     stages=((("bottle",), 32, 1, 0.25),
                                             (("bottle",), 64, 2, 0.25),
                                             (("bottle", "self_attn"), 96, 2, 0.25),
                                             (("self_attn", "self_attn"), 128, 2, 0.25)))),
    # SegFormer: MiT stages (64 px: every reduced key/value map 2x2) and the all-MLP decoder;
    # without B0's drop path and head dropout (0.1), whose noise can outweigh one step's gain.
    "segformer": ("segformer_b0", dict(img_size=64, embed_dims=(8, 16, 24, 32),
                                       num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2),
                                       depths=(1, 1, 1, 1), decoder_dim=16, num_classes=5,
                                       drop_path_rate=0.0, decoder_dropout=0.0)),
    # Swin-UNet: four stages (the official decoder indexes four skips), a shifted stage at 32 px.
    # SETR-MLA: the MLA neck over four blocks, the align-corners 4x upsampling, logits at 32 px.
    "setr": ("setr_mla_vit_large", dict(img_size=32, patch_size=8, embed_dim=16, depth=4,
                                        num_heads=2, mla_indices=(0, 1, 2, 3), mla_channels=8,
                                        mlahead_channels=8, num_classes=5)),
    "swin_unet": ("swin_unet_tiny_224", dict(img_size=32, embed_dim=8, depths=(2, 2, 2, 2),
                                             num_heads=(1, 2, 2, 4), window_size=4,
                                             num_classes=5)),
    # MedT family: the gated axial U-Net (gated axial attention, all four stages, the stride-2
    # decoder1); MedT's patch graph is exported in tests/test_medt.py.
    # Width 1/16: at 1/32 one AdamW step at lr 1e-4 moved the loss by ~1e-5, either way.
    "medt": ("gated_axial_unet", dict(img_size=32, width_scale=0.0625, groups=2,
                                      depths=(1, 1, 1, 1), num_classes=5)),
    # ResNet (torchvision layout): one bottleneck per stage, projection shortcuts, narrow.
    "resnet": ("resnet50", dict(img_size=64, layers=(1, 1, 1, 1), widths=(8, 16, 24, 32),
                                num_classes=5)),
    # Deformable DETR two-stage (box refinement, encoder proposals, top-k) on a one-bottleneck
    # ResNet: 4 levels at 64 px (8x8 .. 1x1), 1 encoder / 2 decoder layers; dropout off.
    "deformable_detr": ("deformable_detr_resnet50_two_stage", dict(
        img_size=64, backbone_layers=(1, 1, 1, 1), backbone_widths=(4, 8, 8, 16), embed_dim=32,
        num_heads=2, enc_layers=1, dec_layers=2, enc_points=2, dec_points=2, ffn_dim=64,
        num_queries=5, num_classes=5, dropout=0.0)),
    # DETR on a one-bottleneck ResNet (frozen BN, 2x2 C5 at 64 px), 2 encoder / 2 decoder
    # layers, 10 queries; dropout off for the one-step check.
    "detr": ("detr_resnet50", dict(img_size=64, backbone_args=dict(layers=(1, 1, 1, 1),
                                                                   widths=(8, 16, 24, 32)),
                                   hidden_dim=32, num_heads=4, enc_layers=2, dec_layers=2,
                                   ffn_dim=64, num_queries=10, num_classes=5, dropout=0.0)),
    # YOLOS-S: [CLS] + 10 [DET] tokens, a mid-layer position embedding after the first block.
    "yolos": ("yolos_s", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_queries=10, num_classes=5)),
}


def family_of(case):
    """The registry family of a case's model."""
    return keras_vit.get_model_config(SMALLEST[case][0])["family"]


def task_of(case):
    """``"classification"`` or ``"segmentation"``: the registry's task of a case's model."""
    return keras_vit.get_model_config(SMALLEST[case][0])["task"]


def classification_cases():
    """Cases whose models classify: the only ones with a headless form and features_only."""
    return [case for case in SMALLEST if task_of(case) == "classification"]


def registered_families():
    return sorted({keras_vit.get_model_config(n)["family"] for n in keras_vit.list_models()})


def missing_families():
    """Registered families with no case in SMALLEST."""
    covered = {family_of(case) for case in SMALLEST}
    return [f for f in registered_families() if f not in covered]


def build_smallest(case, **overrides):
    """The smallest model of a case (a family name, or ``pvt_v2``); kwargs override the table."""
    name, kwargs = SMALLEST[case]
    return keras_vit.create_model(name, **{**kwargs, **overrides})


def smallest_input(case, batch=2, seed=0):
    """A deterministic float32 batch (NHWC) of the size the case's model takes."""
    img_size = SMALLEST[case][1]["img_size"]
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    return np.random.default_rng(seed).standard_normal((batch, h, w, 3)).astype(np.float32)
