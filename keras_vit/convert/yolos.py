"""YOLOS: position embeddings reordered and resized as the reference does, and Hugging Face
transformers' ``YolosForObjectDetection`` naming renamed to the official one.

The Keras layers mirror the official module paths (hustvl/YOLOS ``Detector``: ``backbone.
cls_token``, ``backbone.det_token``, ``backbone.pos_embed``, ``backbone.mid_pos_embed``,
``backbone.blocks.N.*``, ``backbone.norm``, ``class_embed.layers.N``, ``bbox_embed.layers.N``).

Position embeddings: the checkpoint's rows are [CLS, patches, DET] for the grid of its
``init_pe_size`` (``mid_pe_size``), the model's [CLS, DET, patches] for its input
(``keras_vit/detection/yolos.py``). The patch rows are resized as the reference's
``InterpolateInitPosEmbed`` / ``InterpolateMidPosEmbed`` do at every forward: bicubic,
align_corners=False, no antialias; [CLS] and [DET] rows kept.
"""

import math
import re

import numpy as np

from keras_vit.convert.core import (
    _beside,
    register_layer_converter,
    register_state_dict_adapter,
    to_numpy,
)
from keras_vit.detection.yolos import DetPositionEmbedding
from keras_vit.layers.embedding import resample_position_embedding


def checkpoint_grid(num_patches, layer):
    """The patch grid of a checkpoint embedding with ``num_patches`` patch rows: its
    ``source_grid`` (init_pe_size / patch), the model's own, or a square."""
    for grid in (layer.source_grid, layer.grid_size):
        if grid[0] * grid[1] == num_patches:
            return tuple(grid)
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    raise ValueError(f"a {num_patches}-patch position embedding fits neither the grid "
                     f"{layer.source_grid} the model was told (init_pe_size / mid_pe_size) nor "
                     f"its own {layer.grid_size}; build it with the checkpoint's init_pe_size "
                     "and mid_pe_size")


def to_model_embedding(embedding, layer):
    """One (1, 1 + patches + DET, D) reference embedding -> the layer's (1, 1 + DET +
    patches', D): rows reordered, the patch grid resized to the layer's."""
    num_det = layer.num_prefix_tokens - 1
    if embedding.ndim != 3 or embedding.shape[1] <= layer.num_prefix_tokens:
        raise ValueError(f"expected (1, 1 + patches + {num_det}, D), got {embedding.shape}")
    cls, patches, det = embedding[:, :1], embedding[:, 1:-num_det], embedding[:, -num_det:]
    old_grid = checkpoint_grid(patches.shape[1], layer)
    prefixed = np.concatenate([cls, det, patches], axis=1)
    return resample_position_embedding(prefixed, layer.grid_size, layer.num_prefix_tokens,
                                       old_grid=old_grid, method="bicubic", antialias=False)


@register_layer_converter(DetPositionEmbedding)
def _det_position_embedding(layer, path, options):
    if layer.index is None:  # backbone.pos_embed (1, N, D)
        return [(layer.pos_embed, _beside(path, "pos_embed"),
                 lambda a: to_model_embedding(a, layer))]

    def mid_row(a):  # backbone.mid_pos_embed (depth - 1, 1, N, D): row ``index``
        if a.ndim != 4 or a.shape[0] <= layer.index:
            raise ValueError(f"expected (depth - 1, 1, N, D) with a row {layer.index}, "
                             f"got {a.shape}")
        return to_model_embedding(a[layer.index], layer)

    # Layer backbone.mid_pos_embed.i reads the official parameter backbone.mid_pos_embed.
    return [(layer.pos_embed, path.rsplit(".", 1)[0], mid_row)]


# Hugging Face key -> official key, in order (transformers 5's state_dict() names and the
# hub files' differ only in the mid-layer embedding's module).
_HF_PATTERNS = tuple((re.compile(p), r) for p, r in (
    (r"^vit\.embeddings\.cls_token$", "backbone.cls_token"),
    (r"^vit\.embeddings\.detection_tokens$", "backbone.det_token"),
    (r"^vit\.embeddings\.position_embeddings$", "backbone.pos_embed"),
    (r"^vit\.embeddings\.patch_embeddings\.projection\.", "backbone.patch_embed.proj."),
    (r"^vit\.encoder\.(interpolation\.)?mid_position_embeddings$", "backbone.mid_pos_embed"),
    (r"^vit\.encoder\.layer\.(\d+)\.", r"backbone.blocks.\1."),
    (r"^vit\.layernorm\.", "backbone.norm."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.attention\.(query|key|value)\.", r".attn.\1."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
))
_QUERY_KEY_VALUE = re.compile(r"^(.*\.attn)\.(query|key|value)\.(weight|bias)$")


def yolos_hf_to_official(state_dict):
    """A Hugging Face ``YolosForObjectDetection`` state dict with the official YOLOS keys;
    query, key and value Linears joined into ``qkv`` ([q; k; v] rows, the official
    ``qkv(x).reshape(B, N, 3, heads, d)`` order). Keys it does not know pass through
    unchanged (a strict load then lists them)."""
    out, parts = {}, {}
    for key, value in state_dict.items():
        for pattern, repl in _HF_PATTERNS:
            key = pattern.sub(repl, key)
        m = _QUERY_KEY_VALUE.match(key)
        if m:
            parts.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            out[key] = value
    for (attn, param), qkv in parts.items():
        if set(qkv) != {"query", "key", "value"}:  # incomplete: left for the strict load
            out.update({f"{attn}.{part}.{param}": v for part, v in qkv.items()})
            continue
        out[f"{attn}.qkv.{param}"] = np.concatenate(
            [to_numpy(qkv[part]) for part in ("query", "key", "value")], 0)
    return out


@register_state_dict_adapter
def _yolos_checkpoint(model, state_dict):
    if not any(isinstance(layer, DetPositionEmbedding) for layer in model.layers):
        return None
    if any(key.startswith("vit.embeddings.") for key in state_dict):
        return yolos_hf_to_official(state_dict)
    return None
