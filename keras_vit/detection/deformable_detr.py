"""Deformable DETR (Zhu et al. 2021, fundamentalvision/Deformable-DETR): multi-scale deformable
attention over four feature levels, reference points, sigmoid classification.

ResNet-50 (torchvision layout, frozen BatchNorm; keras_vit.models.resnet) gives C3..C5; each
goes through a 1x1 conv + GroupNorm(32) (``input_proj.l``), and a fourth level is a 3x3
stride-2 conv + GroupNorm on C5. Levels carry the sine position embedding (normalised, offset
-0.5 as the official) plus a learned level embedding. Six post-norm encoder layers of
``MultiScaleDeformableAttention`` (reference points at every pixel centre, scaled by each
level's valid ratio) and six decoder layers (self-attention, then deformable cross-attention
around reference points) with FFN 1024, d=256, 8 heads, 4 points, 300 queries. Variants:

* ``deformable_detr_resnet50``: reference points from the query position embedding by a
  linear layer + sigmoid; one class head and one box MLP shared by every decoder layer.
* ``deformable_detr_resnet50_box_refine``: iterative box refinement, per-layer heads, each
  layer's box refining the next layer's reference points.
* ``deformable_detr_resnet50_two_stage``: box refinement plus encoder proposals: every encoder
  pixel proposes a box (an extra class head / box MLP), the top-``num_queries`` by their first
  class logit give the decoder's reference boxes and, through their sine embedding,
  ``pos_trans``, its queries.

Outputs ``{"logits": (B, Q, classes), "pred_boxes": (B, Q, 4)}`` (cx, cy, w, h in [0, 1]); with
``aux_outputs=True`` also ``aux_logits`` / ``aux_pred_boxes`` of the earlier decoder layers
(B, layers - 1, ...) and, for two-stage, ``enc_logits`` / ``enc_pred_boxes`` of every encoder
proposal. ``with_pixel_mask=True`` adds the ``pixel_mask`` input (B, H, W), 1 = real pixel,
brought to each level by nearest interpolation as the reference.

Layer names are the official module paths (``backbone.0.body.layer1.0.conv1``,
``input_proj.0.0``, ``transformer.encoder.layers.0.self_attn.sampling_offsets``,
``transformer.decoder.layers.0.self_attn`` (DETR's PositionalAttention: the official
nn.MultiheadAttention's in_proj split by keras_vit/convert/detr.py), ``query_embed``,
``class_embed.0``, ``bbox_embed.0.layers.0``); keras_vit/convert/deformable_detr.py maps the
rest and renames Hugging Face's ``DeformableDetrForObjectDetection`` checkpoints.
"""

import math

import numpy as np
import keras
from keras import ops

from keras_vit.detection.detr import PositionalAttention, sine_divisors
from keras_vit.detection.yolos import PredictionMLP
from keras_vit.layers import Linear, MultiScaleDeformableAttention
from keras_vit.models.common import check_img_size, check_in_chans
from keras_vit.models.resnet import resnet
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant

NUM_LEVELS = 4  # C3, C4, C5 and the stride-2 conv on C5


def level_shapes(h, w):
    """(h, w) of C3, C4, C5 (strides 8, 16, 32) and the extra level (3x3, stride 2, pad 1)."""
    shapes = [(h // s, w // s) for s in (8, 16, 32)]
    shapes.append(((shapes[-1][0] - 1) // 2 + 1, (shapes[-1][1] - 1) // 2 + 1))
    return tuple(shapes)


def nearest_indices(size_in, size_out):
    """torch's F.interpolate(mode="nearest") source index of every output position."""
    scale = np.float32(size_in) / np.float32(size_out)
    return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int32),
                      size_in - 1)


def interleave_sin_cos(x):
    """sin at even, cos at odd feature indices (the reference's stack + flatten)."""
    even = (np.arange(x.shape[-1]) % 2 == 0)
    return ops.where(even, ops.sin(x), ops.cos(x))


def inverse_sigmoid(x, eps=1e-5):
    """The official log(x1 / x2) as log(x1) - log(x2): in an int8 file the clipped 1 - x
    can quantize to zero, and an int8 DIV by zero aborts the interpreter."""
    x = ops.clip(x, 0.0, 1.0)
    return ops.log(ops.maximum(x, eps)) - ops.log(ops.maximum(1.0 - x, eps))


@keras.saving.register_keras_serializable(package="keras_vit")
class LevelMasks(keras.layers.Layer):
    """Pixel mask (B, H, W), 1 = real -> per level masks flattened and concatenated (B, S),
    the levels' valid ratios (B, levels, 2) as (width, height) fractions, the sine position
    embedding plus the level embedding ``level_embed`` (B, S, dim)."""

    def __init__(self, img_size, dim, temperature=10000, **kwargs):
        super().__init__(**kwargs)
        self.img_size, self.dim, self.temperature = tuple(img_size), int(dim), temperature
        self.shapes = level_shapes(*self.img_size)

    def build(self, pixel_mask_shape):
        self.level_embed = self.add_weight(name="level_embed", shape=(NUM_LEVELS, self.dim),
                                           initializer=keras.initializers.RandomNormal(0, 1))

    def level_masks(self, mask):
        h, w = self.img_size
        out = []
        for hl, wl in self.shapes:
            m = ops.take(ops.take(mask, nearest_indices(h, hl), axis=1), nearest_indices(w, wl),
                         axis=2)
            out.append(ops.cast(ops.not_equal(m, 0), mask.dtype))
        return out

    def position_embedding(self, m):
        """DETR's normalised sine embedding with Deformable DETR's -0.5 offset (B, h, w, dim)."""
        y = ops.cumsum(m, axis=1)
        x = ops.cumsum(m, axis=2)
        scale = 2 * math.pi
        y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * scale
        x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * scale
        dim_t = sine_divisors(self.dim // 2, self.temperature)
        pos_y = interleave_sin_cos(y[..., None] / dim_t)
        pos_x = interleave_sin_cos(x[..., None] / dim_t)
        return ops.concatenate([pos_y, pos_x], axis=-1)

    def call(self, pixel_mask):
        masks = self.level_masks(pixel_mask)
        flat, ratios, pos = [], [], []
        for level, (m, (hl, wl)) in enumerate(zip(masks, self.shapes)):
            flat.append(ops.reshape(m, (-1, hl * wl)))
            ratios.append(ops.stack([ops.sum(m[:, 0, :], axis=1) / wl,
                                     ops.sum(m[:, :, 0], axis=1) / hl], axis=-1))
            p = ops.reshape(self.position_embedding(m), (-1, hl * wl, self.dim))
            pos.append(p + self.level_embed[level])
        return (ops.concatenate(flat, axis=1), ops.stack(ratios, axis=1),
                ops.concatenate(pos, axis=1))

    def compute_output_shape(self, pixel_mask_shape):
        s = sum(h * w for h, w in self.shapes)
        b = pixel_mask_shape[0]
        return (b, s), (b, NUM_LEVELS, 2), (b, s, self.dim)

    def get_config(self):
        return {**super().get_config(), "img_size": self.img_size, "dim": self.dim,
                "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="keras_vit")
class EncoderReferencePoints(keras.layers.Layer):
    """Every level's pixel centres, normalised by its valid size, seen from every level
    (the official ``get_reference_points``): valid ratios (B, levels, 2) -> (B, S, levels, 2)."""

    def __init__(self, spatial_shapes, **kwargs):
        super().__init__(**kwargs)
        self.spatial_shapes = tuple(tuple(int(v) for v in s) for s in spatial_shapes)

    def call(self, valid_ratios):
        refs = []
        for level, (h, w) in enumerate(self.spatial_shapes):
            ry, rx = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5,
                                 np.arange(w, dtype=np.float32) + 0.5, indexing="ij")
            ref_y = ry.reshape(1, -1) / (valid_ratios[:, None, level, 1] * h)
            ref_x = rx.reshape(1, -1) / (valid_ratios[:, None, level, 0] * w)
            refs.append(ops.stack([ref_x, ref_y], axis=-1))
        refs = ops.concatenate(refs, axis=1)
        return refs[:, :, None] * valid_ratios[:, None]

    def compute_output_shape(self, ratios_shape):
        s = sum(h * w for h, w in self.spatial_shapes)
        return (ratios_shape[0], s, len(self.spatial_shapes), 2)

    def get_config(self):
        return {**super().get_config(), "spatial_shapes": self.spatial_shapes}


def _linear(units, name, **kwargs):
    return Linear(units, name=name, **kwargs)


def _norm(name):
    return keras.layers.LayerNormalization(epsilon=1e-5, name=name)


class _DeformableLayer(keras.layers.Layer):
    """What the encoder and decoder layers share: the configuration, the official FFN
    (``linear1`` ReLU ``linear2``), dropouts, post-norm residuals."""

    def __init__(self, dim, ffn_dim, num_heads, num_points, spatial_shapes, dropout=0.1,
                 **kwargs):
        super().__init__(**kwargs)
        self.dim, self.ffn_dim, self.num_heads = int(dim), int(ffn_dim), int(num_heads)
        self.num_points, self.dropout = int(num_points), float(dropout)
        self.spatial_shapes = tuple(tuple(int(v) for v in s) for s in spatial_shapes)
        self.linear1 = _linear(ffn_dim, "linear1", activation="relu")
        self.linear2 = _linear(dim, "linear2")
        self.drops = [keras.layers.Dropout(self.dropout) for _ in range(4)]

    def deformable_attention(self, name):
        return MultiScaleDeformableAttention(self.dim, self.spatial_shapes, self.num_heads,
                                             self.num_points, name=name)

    def build_ffn(self, x_shape, norms):
        for layer in (*norms, self.linear1):
            layer.build(x_shape)
        self.linear2.build(tuple(x_shape[:-1]) + (self.ffn_dim,))

    def residual(self, norm, x, y, drop, training):
        return norm(x + self.drops[drop](y, training=training))

    def ffn(self, x, norm, training):
        y = self.linear2(self.drops[2](self.linear1(x), training=training))
        return self.residual(norm, x, y, 3, training)

    def compute_output_shape(self, x_shape, *args, **kwargs):
        return x_shape

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "ffn_dim": self.ffn_dim,
                "num_heads": self.num_heads, "num_points": self.num_points,
                "spatial_shapes": self.spatial_shapes, "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="keras_vit")
class DeformableEncoderLayer(_DeformableLayer):
    """Post-norm: norm1(x + MSDeformAttn(x + pos)), norm2(x + linear2(relu(linear1(x))))."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.self_attn = self.deformable_attention("self_attn")
        self.norm1, self.norm2 = _norm("norm1"), _norm("norm2")

    def build(self, x_shape, pos_shape=None, reference_points_shape=None,
              value_mask_shape=None):
        self.self_attn.build(x_shape, None, x_shape)
        self.build_ffn(x_shape, (self.norm1, self.norm2))

    def call(self, x, pos, reference_points, value_mask, training=None):
        attn = self.self_attn(x + pos, reference_points, x, value_mask)
        return self.ffn(self.residual(self.norm1, x, attn, 0, training), self.norm2, training)


@keras.saving.register_keras_serializable(package="keras_vit")
class DeformableDecoderLayer(_DeformableLayer):
    """tgt = norm2(tgt + self_attn(q=k=tgt+pos, v=tgt)); tgt = norm1(tgt + cross_attn(tgt + pos
    around the reference points scaled by the valid ratios)); tgt = norm3(tgt + FFN(tgt))."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cross_attn = self.deformable_attention("cross_attn")
        self.self_attn = PositionalAttention(self.dim, self.num_heads, name="self_attn")  # DETR's
        self.norm1, self.norm2, self.norm3 = _norm("norm1"), _norm("norm2"), _norm("norm3")

    def build(self, x_shape, pos_shape=None, reference_points_shape=None,
              valid_ratios_shape=None, memory_shape=None, value_mask_shape=None):
        self.self_attn.build(x_shape)
        self.cross_attn.build(x_shape, None, memory_shape or x_shape)
        self.build_ffn(x_shape, (self.norm1, self.norm2, self.norm3))

    def call(self, x, pos, reference_points, valid_ratios, memory, value_mask, training=None):
        ratios = valid_ratios if reference_points.shape[-1] == 2 else ops.concatenate(
            [valid_ratios, valid_ratios], axis=-1)
        ref = reference_points[:, :, None] * ratios[:, None]
        x = self.residual(self.norm2, x, self.self_attn(x, query_pos=pos, training=training), 0,
                          training)
        attn = self.cross_attn(x + pos, ref, memory, value_mask)
        return self.ffn(self.residual(self.norm1, x, attn, 1, training), self.norm3, training)


@keras.saving.register_keras_serializable(package="keras_vit")
class BoxMLP(PredictionMLP):
    """DETR's box ``MLP`` with the official initialisation of its last Linear: zero weights,
    bias ``last_bias`` ((0, 0, -2, -2) for the first / shared head, zeros otherwise)."""

    def __init__(self, hidden_dim, output_dim=4, num_layers=3, last_bias=None, **kwargs):
        super().__init__(hidden_dim, output_dim, num_layers, **kwargs)
        self.last_bias = None if last_bias is None else [float(v) for v in last_bias]
        self.linears[-1].kernel_initializer = keras.initializers.Zeros()
        self.linears[-1].bias_initializer = (
            keras.initializers.Constant(self.last_bias) if self.last_bias is not None
            else keras.initializers.Zeros())

    def get_config(self):
        return {**super().get_config(), "last_bias": self.last_bias}


@keras.saving.register_keras_serializable(package="keras_vit")
class BoxFromReference(keras.layers.Layer):
    """sigmoid(delta + inverse_sigmoid(reference)); a 2-coordinate reference moves the centre
    only. ``detach``: no gradient into the next layer's reference (iterative refinement)."""

    def __init__(self, detach=False, **kwargs):
        super().__init__(**kwargs)
        self.detach = bool(detach)

    def call(self, delta, reference):
        inv = inverse_sigmoid(reference)
        if reference.shape[-1] == 2:
            inv = ops.concatenate([inv, ops.zeros_like(inv)], axis=-1)
        box = ops.sigmoid(delta + inv)
        return ops.stop_gradient(box) if self.detach else box

    def compute_output_shape(self, delta_shape, reference_shape=None):
        return delta_shape

    def get_config(self):
        return {**super().get_config(), "detach": self.detach}


@keras.saving.register_keras_serializable(package="keras_vit")
class LearnedQueries(keras.layers.Layer):
    """``query_embed`` (num_queries, 2 * dim) -> (query_pos, tgt), each (B, Q, dim), tiled over
    the batch of its input."""

    def __init__(self, num_queries, dim, **kwargs):
        super().__init__(**kwargs)
        self.num_queries, self.dim = int(num_queries), int(dim)

    def build(self, x_shape):
        self.weight = self.add_weight(name="weight", shape=(self.num_queries, 2 * self.dim),
                                      initializer=keras.initializers.RandomNormal(0, 1))

    def call(self, x):
        q = ops.zeros_like(x[:, :1, :1]) + self.weight[None]
        return q[..., :self.dim], q[..., self.dim:]

    def compute_output_shape(self, x_shape):
        s = (x_shape[0], self.num_queries, self.dim)
        return s, s

    def get_config(self):
        return {**super().get_config(), "num_queries": self.num_queries, "dim": self.dim}


@keras.saving.register_keras_serializable(package="keras_vit")
class EncoderProposals(keras.layers.Layer):
    """Two-stage: every encoder pixel's proposal box (centre at the pixel, side 0.05 * 2^level,
    normalised by the valid size) as inverse-sigmoid logits, +inf where padded or too close to
    the border; the encoder output zeroed there (the official ``gen_encoder_output_proposals``
    before ``enc_output``). Inputs: memory (B, S, dim), mask (B, S), valid sizes from the mask."""

    def __init__(self, spatial_shapes, **kwargs):
        super().__init__(**kwargs)
        self.spatial_shapes = tuple(tuple(int(v) for v in s) for s in spatial_shapes)

    def call(self, memory, value_mask):
        mask = value_mask
        proposals, start = [], 0
        for level, (h, w) in enumerate(self.spatial_shapes):
            m = ops.reshape(mask[:, start:start + h * w], (-1, h, w))
            start += h * w
            valid_h = ops.sum(m[:, :, 0], axis=1)[:, None, None]
            valid_w = ops.sum(m[:, 0, :], axis=1)[:, None, None]
            gy, gx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                                 indexing="ij")
            cx = ops.reshape((gx + 0.5) / valid_w, (-1, h * w, 1))
            cy = ops.reshape((gy + 0.5) / valid_h, (-1, h * w, 1))
            side = ops.ones_like(cx) * (0.05 * 2.0 ** level)
            proposals.append(ops.concatenate([cx, cy, side, side], axis=-1))
        proposals = ops.concatenate(proposals, axis=1)
        inside = ops.all((proposals > 0.01) & (proposals < 0.99), axis=-1, keepdims=True)
        keep = inside & (mask[..., None] > 0)
        logits = ops.log(proposals / (1 - proposals))
        logits = ops.where(keep, logits, ops.cast(np.inf, logits.dtype))
        return ops.where(keep, memory, ops.zeros_like(memory)), logits

    def compute_output_shape(self, memory_shape, value_mask_shape=None):
        return memory_shape, tuple(memory_shape[:-1]) + (4,)

    def get_config(self):
        return {**super().get_config(), "spatial_shapes": self.spatial_shapes}


@keras.saving.register_keras_serializable(package="keras_vit")
class TopKProposals(keras.layers.Layer):
    """The ``k`` proposals with the highest first-class logit: their box logits (B, k, 4,
    no gradient, as the official's detach) and their sine embedding (B, k, 4 * dim / 2 ...)
    of sigmoid(box) * 2 pi (the official ``get_proposal_pos_embed`` with dim / 2 features)."""

    def __init__(self, k, dim, **kwargs):
        super().__init__(**kwargs)
        self.k, self.dim = int(k), int(dim)

    def call(self, class_logits, box_logits):
        seq = class_logits.shape[1]
        _, idx = ops.top_k(class_logits[..., 0], self.k)
        rows = idx + ops.arange(ops.shape(idx)[0], dtype=idx.dtype)[:, None] * seq
        boxes = ops.take(ops.reshape(box_logits, (-1, 4)), ops.reshape(rows, (-1,)), axis=0)
        boxes = ops.stop_gradient(ops.reshape(boxes, (-1, self.k, 4)))
        dim_t = sine_divisors(self.dim // 2, 10000)
        pos = (ops.sigmoid(boxes) * (2 * math.pi))[..., None] / dim_t  # (B, k, 4, dim/2)
        pos = ops.reshape(interleave_sin_cos(pos), (-1, self.k, 4 * (self.dim // 2)))
        return boxes, pos

    def compute_output_shape(self, class_logits_shape, box_logits_shape=None):
        b = class_logits_shape[0]
        return (b, self.k, 4), (b, self.k, 2 * self.dim)

    def get_config(self):
        return {**super().get_config(), "k": self.k, "dim": self.dim}


@keras.saving.register_keras_serializable(package="keras_vit")
class SplitHalves(keras.layers.Layer):
    """(…, 2 * dim) -> (first half, second half): the official ``torch.split(x, dim, -1)``."""

    def call(self, x):
        d = x.shape[-1] // 2
        return x[..., :d], x[..., d:]

    def compute_output_shape(self, x_shape):
        s = tuple(x_shape[:-1]) + (x_shape[-1] // 2,)
        return s, s


@keras.saving.register_keras_serializable(package="keras_vit")
class StackLayers(keras.layers.Layer):
    """Per-decoder-layer outputs stacked on axis 1 (the auxiliary outputs)."""

    def call(self, xs):
        return ops.stack(xs, axis=1)

    def compute_output_shape(self, shapes):
        return (shapes[0][0], len(shapes)) + tuple(shapes[0][1:])


@keras.saving.register_keras_serializable(package="keras_vit")
class FirstOf(keras.layers.Layer):
    """Its first input, unchanged; the others only keep their layers in the graph."""

    def call(self, xs):
        return xs[0]

    def compute_output_shape(self, shapes):
        return shapes[0]


@keras.saving.register_keras_serializable(package="keras_vit")
class OnesMask(keras.layers.Layer):
    """An all-real pixel mask (B, H, W) for models built without the ``pixel_mask`` input."""

    def call(self, images):
        return ops.ones_like(images[..., 0])

    def compute_output_shape(self, shape):
        return tuple(shape[:-1])


def _check_args(img_size, num_queries, embed_dim, num_heads, with_box_refine, two_stage):
    if embed_dim % 32:
        raise ValueError(f"embed_dim must be a multiple of 32 (GroupNorm(32)), got {embed_dim}")
    if embed_dim % num_heads or (embed_dim // 2) % 2:
        raise ValueError(f"embed_dim {embed_dim} must divide into {num_heads} heads")
    if num_queries < 1:
        raise ValueError(f"num_queries must be positive, got {num_queries}")
    if two_stage and not with_box_refine:
        raise ValueError("two_stage needs with_box_refine=True (as the official and transformers)")


def deformable_detr(*, img_size=(800, 1344), in_chans=3, num_classes=91, num_queries=300,
                    backbone_depth=50, backbone_layers=None, backbone_widths=(64, 128, 256, 512),
                    backbone_stem_width=64, frozen_batch_norm=True, embed_dim=256,
                    num_heads=8, enc_layers=6, dec_layers=6, enc_points=4, dec_points=4,
                    ffn_dim=1024, dropout=0.1, with_box_refine=False, two_stage=False,
                    aux_outputs=False, with_pixel_mask=False, name="deformable_detr"):
    """Deformable DETR as a functional model (see the module docstring).

    img_size: a multiple of 32 (the ResNet's stride; the reference's 800x1333 is (800, 1344)
    here). backbone_depth / backbone_layers / backbone_widths / backbone_stem_width: the
    ResNet (50: bottlenecks (3, 4, 6, 3), planes 64..512, stem 64; smaller ones for tests).
    frozen_batch_norm: the official FrozenBatchNorm2d (right for a pretrained backbone);
    False gives trainable BatchNorm, what training from scratch needs (frozen statistics of a
    random backbone normalise nothing). num_queries: the decoder's queries (two-stage: the
    number of encoder proposals kept).
    """
    _check_args(img_size, num_queries, embed_dim, num_heads, with_box_refine, two_stage)
    h, w = check_img_size(img_size, 32, what="the network stride")
    check_in_chans(in_chans)
    images = keras.Input((h, w, in_chans), name="images")
    # The ResNet builds on our image input; its layers get the official ``backbone.0.body``
    # prefix (the Joiner's backbone body) so that checkpoint keys map by name.
    body = resnet(depth=backbone_depth, block="bottleneck" if backbone_layers else None,
                  layers=backbone_layers, widths=backbone_widths, stem_width=backbone_stem_width,
                  img_size=(h, w), in_chans=in_chans,
                  features_only=True, out_indices=(1, 2, 3),
                  frozen_batch_norm=frozen_batch_norm,
                  inputs=images, name="backbone.0.body")
    for layer in body.layers:
        if not isinstance(layer, keras.layers.InputLayer):
            layer.name = f"backbone.0.body.{layer.name}"
    features = list(body.outputs)

    if with_pixel_mask:
        pixel_mask = keras.Input((h, w), name="pixel_mask")
        model_inputs = [images, pixel_mask]
    else:
        pixel_mask = OnesMask(name="pixel_mask_ones")(images)
        model_inputs = images
    shapes = level_shapes(h, w)
    mask, valid_ratios, pos = LevelMasks((h, w), embed_dim, name="transformer.level_embed")(
        pixel_mask)

    sources = []
    for level in range(NUM_LEVELS):
        if level < 3:
            x = keras.layers.Conv2D(embed_dim, 1, kernel_initializer="glorot_uniform",
                                    name=f"input_proj.{level}.0")(features[level])
        else:
            x = keras.layers.ZeroPadding2D(1, name=f"input_proj.{level}.pad")(features[-1])
            x = keras.layers.Conv2D(embed_dim, 3, strides=2, kernel_initializer="glorot_uniform",
                                    name=f"input_proj.{level}.0")(x)
        x = keras.layers.GroupNormalization(32, epsilon=1e-5, name=f"input_proj.{level}.1")(x)
        hl, wl = shapes[level]
        sources.append(keras.layers.Reshape((hl * wl, embed_dim),
                                            name=f"input_proj.{level}.flatten")(x))
    src = keras.layers.Concatenate(axis=1, name="transformer.src_flatten")(sources)

    ref = EncoderReferencePoints(shapes, name="transformer.encoder.reference_points")(valid_ratios)
    memory = src
    for i in range(enc_layers):
        memory = DeformableEncoderLayer(embed_dim, ffn_dim, num_heads, enc_points, shapes, dropout,
                                        name=f"transformer.encoder.layers.{i}")(
            memory, pos, ref, mask)

    num_pred = dec_layers + (1 if two_stage else 0)
    prior_bias = -math.log((1 - 0.01) / 0.01)
    box_bias = (0.0, 0.0, 0.0, 0.0) if two_stage else (0.0, 0.0, -2.0, -2.0)
    heads = num_pred if with_box_refine else 1

    def class_head(i):
        return Linear(num_classes, bias_initializer=keras.initializers.Constant(
            prior_bias), name=f"class_embed.{i}")

    class_embed = [class_head(i) for i in range(heads)]
    # Box refinement's first head and the shared one start at (0, 0, -2, -2) (the official).
    bbox_embed = [BoxMLP(embed_dim, 4, 3, box_bias if i == 0 else (0.0,) * 4,
                         name=f"bbox_embed.{i}") for i in range(heads)]
    if not with_box_refine:
        class_embed, bbox_embed = class_embed * num_pred, bbox_embed * num_pred

    extra = {}
    if two_stage:
        enc_memory, proposals = EncoderProposals(shapes, name="transformer.enc_proposals")(
            memory, mask)
        x = Linear(embed_dim, name="transformer.enc_output")(enc_memory)
        x = _norm("transformer.enc_output_norm")(x)
        enc_logits = class_embed[dec_layers](x)
        enc_boxes = keras.layers.Add(name="transformer.enc_box_logits")(
            [bbox_embed[dec_layers](x), proposals])
        top_boxes, top_pos = TopKProposals(num_queries, embed_dim, name="transformer.topk")(
            enc_logits, enc_boxes)
        reference = keras.layers.Activation("sigmoid", name="transformer.init_reference")(
            top_boxes)
        x = Linear(2 * embed_dim, name="transformer.pos_trans")(top_pos)
        x = _norm("transformer.pos_trans_norm")(x)
        query_pos, tgt = SplitHalves(name="transformer.query_split")(x)
        if aux_outputs:
            extra["enc_logits"] = enc_logits
            extra["enc_pred_boxes"] = keras.layers.Activation("sigmoid", name="enc_pred_boxes")(
                enc_boxes)
    else:
        query_pos, tgt = LearnedQueries(num_queries, embed_dim, name="query_embed")(src)
        reference = Linear(2, activation="sigmoid", kernel_initializer="glorot_uniform",
                           name="transformer.reference_points")(query_pos)

    logits, boxes = [], []
    for i in range(dec_layers):
        tgt = DeformableDecoderLayer(embed_dim, ffn_dim, num_heads, dec_points, shapes, dropout,
                                     name=f"transformer.decoder.layers.{i}")(
            tgt, query_pos, reference, valid_ratios, memory, mask)
        logits.append(class_embed[i](tgt))
        delta = bbox_embed[i](tgt)
        boxes.append(BoxFromReference(name=f"pred_boxes.{i}")(delta, reference))
        if with_box_refine:  # the box refines the next layer's reference (no gradient)
            reference = BoxFromReference(detach=True, name=f"transformer.decoder.refine.{i}")(
                delta, reference)

    outputs = {"logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux_outputs and dec_layers > 1:
        outputs["aux_logits"] = StackLayers(name="aux_logits")(logits[:-1])
        outputs["aux_pred_boxes"] = StackLayers(name="aux_pred_boxes")(boxes[:-1])
    elif with_box_refine and dec_layers > 1:
        # The earlier layers' own class heads feed only the auxiliary outputs; they stay in
        # the graph (their weights load strictly and count as the reference's).
        outputs["logits"] = FirstOf(name="logits")([logits[-1]] + logits[:-1])
    outputs.update(extra)
    return keras.Model(model_inputs, outputs, name=name)


_CFG = dict(task="detection", input_size=(800, 1344), num_classes=91, mean=IMAGENET_MEAN,
            std=IMAGENET_STD)
register_variant("deformable_detr_resnet50", deformable_detr, __name__, _CFG)
register_variant("deformable_detr_resnet50_box_refine", deformable_detr, __name__, _CFG,
                 with_box_refine=True)
register_variant("deformable_detr_resnet50_two_stage", deformable_detr, __name__, _CFG,
                 with_box_refine=True, two_stage=True)
