"""YOLOS (Fang et al. 2021, hustvl/YOLOS): a plain DeiT whose [CLS] is joined by learned [DET]
tokens; the final LayerNorm's [DET] outputs go through two 3-layer MLPs (classes + no-object,
and sigmoid boxes). There is no decoder, hence no auxiliary outputs.

Layer names mirror the official module paths (``models/detector.py``'s ``Detector``:
``backbone.*`` of its ``VisionTransformer``, ``class_embed`` / ``bbox_embed``); Hugging Face's
``YolosForObjectDetection`` naming is renamed by ``keras_vit/convert/yolos.py``.

The reference's sequence is [CLS, patches, DET]; here it is [CLS, DET, patches] so that the
core ``PrefixTokens`` / ``PositionEmbedding`` layers hold the tokens. Self-attention,
LayerNorm and MLP act per token or over all tokens alike, so the [DET] outputs are the same;
the converter reorders the checkpoint's position embeddings to match.

Position embeddings: the reference stores them for ``init_pe_size`` (and ``mid_pe_size``)
and resizes their patch grid to every input (bicubic, align_corners=False, no antialias;
[CLS] and [DET] rows kept). Here a model is built for one input size and the checkpoint's
embeddings are resized once, when loaded, the same way; ``init_pe_size`` / ``mid_pe_size``
tell the converter the grid the checkpoint's embeddings were made for.
"""

import keras
from keras import ops

from keras_vit.layers import PatchEmbed, PositionEmbedding, PrefixTokens, TransformerBlock
from keras_vit.layers.common import dense, layer_norm
from keras_vit.layers.embedding import to_2tuple
from keras_vit.models.common import check_img_size, check_in_chans, transformer_blocks
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant


@keras.saving.register_keras_serializable(package="keras_vit")
class DetPositionEmbedding(PositionEmbedding):
    """YOLOS's learned position embedding over [CLS, DET x num_det, patches], (1, N, D).

    ``index`` None: the input embedding (the official ``backbone.pos_embed``); an int i:
    the mid-layer embedding added after block i (row i of ``backbone.mid_pos_embed``,
    (depth - 1, 1, N, D) in the reference). ``source_grid``: the patch grid of the
    checkpoint's embedding (its ``init_pe_size`` / ``mid_pe_size`` // patch), from which
    the converter resizes it to ``grid_size``.
    """

    def __init__(self, grid_size, num_prefix_tokens, source_grid=None, index=None,
                 stddev=0.02, **kwargs):
        super().__init__(grid_size, num_prefix_tokens, stddev=stddev, **kwargs)
        self.source_grid = to_2tuple(source_grid) if source_grid is not None else self.grid_size
        self.index = None if index is None else int(index)

    def get_config(self):
        return {**super().get_config(), "source_grid": self.source_grid, "index": self.index}


@keras.saving.register_keras_serializable(package="keras_vit")
class TokenRange(keras.layers.Layer):
    """(B, N, D) -> (B, count, D): the tokens ``start`` ... ``start + count - 1``."""

    def __init__(self, start, count, **kwargs):
        super().__init__(**kwargs)
        self.start, self.count = int(start), int(count)

    def call(self, x):
        return x[:, self.start:self.start + self.count]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.count, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "start": self.start, "count": self.count}


@keras.saving.register_keras_serializable(package="keras_vit")
class PredictionMLP(keras.layers.Layer):
    """DETR's ``MLP``: ``num_layers`` Linear layers (``layers.0`` ...), ReLU between them."""

    def __init__(self, hidden_dim, output_dim, num_layers=3, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim, self.output_dim = int(hidden_dim), int(output_dim)
        self.num_layers = int(num_layers)
        widths = [self.hidden_dim] * (self.num_layers - 1) + [self.output_dim]
        self.linears = [dense(w, name=f"layers.{i}") for i, w in enumerate(widths)]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for linear in self.linears:
            linear.build(shape)
            shape = shape[:-1] + (linear.units,)

    def call(self, x):
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if i < self.num_layers - 1:
                x = ops.relu(x)
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim,)

    def get_config(self):
        return {**super().get_config(), "hidden_dim": self.hidden_dim,
                "output_dim": self.output_dim, "num_layers": self.num_layers}


def _grid(size, patch_size):
    h, w = to_2tuple(size)
    return h // patch_size, w // patch_size


def yolos(*, img_size=(800, 1328), patch_size=16, in_chans=3, num_classes=91, num_queries=100,
          embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, qkv_bias=True,
          use_mid_position_embeddings=False, init_pe_size=None, mid_pe_size=None,
          norm_eps=1e-6, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
          aux_outputs=False, with_pixel_mask=False, name="yolos"):
    """Builds YOLOS as a functional model: images (B, H, W, in_chans) -> {"logits": (B,
    num_queries, num_classes + 1), "pred_boxes": (B, num_queries, 4) sigmoid (cx, cy, w, h)}.

    num_queries: the [DET] tokens (official ``det_token_num``). use_mid_position_embeddings:
    a position embedding added after every block but the last (YOLOS-S/B). init_pe_size /
    mid_pe_size (official names): the input size the checkpoint's embeddings were made for
    (default: img_size); they set no shape here, only what the loader resizes from.
    norm_eps: the official LayerNorms' 1e-6 (transformers' configs say 1e-12).
    with_pixel_mask: adds the contract's ``pixel_mask`` input, which YOLOS does not read
    (the official Detector runs its backbone on ``samples.tensors`` alone).
    """
    h, w = check_img_size(img_size, patch_size)
    check_in_chans(in_chans)
    if aux_outputs:
        raise ValueError("YOLOS has no decoder, so no auxiliary outputs: use aux_outputs=False")
    for arg, value in (("num_queries", num_queries), ("num_classes", num_classes),
                       ("depth", depth)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    grid = (h // patch_size, w // patch_size)
    init_grid = _grid(init_pe_size or (h, w), patch_size)
    mid_grid = _grid(mid_pe_size or init_pe_size or (h, w), patch_size)
    num_prefix = 1 + num_queries

    images = keras.Input((h, w, in_chans), name="images")
    inputs = [images, keras.Input((h, w), name="pixel_mask")] if with_pixel_mask else images
    x = PatchEmbed(patch_size, embed_dim, name="backbone.patch_embed")(images)
    x = PrefixTokens(("cls_token", "det_token"), counts=(1, num_queries), stddev=0.02,
                     name="backbone.prefix_tokens")(x)
    x = DetPositionEmbedding(grid, num_prefix, source_grid=init_grid,
                             name="backbone.pos_embed")(x)
    x = keras.layers.Dropout(drop_rate, name="backbone.pos_drop")(x)

    def block(i, drop_path):
        transformer = TransformerBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                       drop=drop_rate, attn_drop=attn_drop_rate,
                                       drop_path=drop_path, norm_eps=norm_eps,
                                       name=f"backbone.blocks.{i}")
        if not use_mid_position_embeddings or i == depth - 1:
            return transformer
        mid = DetPositionEmbedding(grid, num_prefix, source_grid=mid_grid, index=i,
                                   name=f"backbone.mid_pos_embed.{i}")
        return lambda t: mid(transformer(t))

    x, _ = transformer_blocks(x, block, depth, drop_path_rate, grid=grid,
                              num_prefix_tokens=num_prefix)
    x = layer_norm(norm_eps, name="backbone.norm")(x)
    det = TokenRange(1, num_queries, name="det_tokens")(x)
    logits = PredictionMLP(embed_dim, num_classes + 1, name="class_embed")(det)
    boxes = PredictionMLP(embed_dim, 4, name="bbox_embed")(det)
    boxes = keras.layers.Activation("sigmoid", name="pred_boxes")(boxes)
    return keras.Model(inputs, {"logits": logits, "pred_boxes": boxes}, name=name)


def _yolos(name, **defaults):
    cfg = dict(task="detection", input_size=(800, 1328), num_classes=91, mean=IMAGENET_MEAN,
               std=IMAGENET_STD)
    return register_variant(name, yolos, __name__, cfg, num_classes=91, **defaults)


# The official configurations (README's commands, backbone.py's tiny/small/base) and
# transformers' hub configs: YOLOS-Ti's embeddings for 800x1333 (a 50x83 grid, the
# 800x1328 input here) without mid-layer ones; YOLOS-S both for 512x864; YOLOS-B for 800x1344.
_yolos("yolos_ti", embed_dim=192, depth=12, num_heads=3, init_pe_size=(800, 1333))
_yolos("yolos_s", embed_dim=384, depth=12, num_heads=6, use_mid_position_embeddings=True,
       init_pe_size=(512, 864), mid_pe_size=(512, 864))
_yolos("yolos_base", embed_dim=768, depth=12, num_heads=12, use_mid_position_embeddings=True,
       init_pe_size=(800, 1344), mid_pe_size=(800, 1344))
