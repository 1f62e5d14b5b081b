"""DETR: the official attentions' fused ``in_proj_weight``, the FFN's ``linear1`` /
``linear2``, the nested backbone model, and Hugging Face transformers' naming.

The Keras layers mirror facebookresearch/detr's module paths (keras_vit/detection/detr.py).
torch's ``nn.MultiheadAttention`` keeps q, k and v in one ``in_proj_weight`` (3d, d) /
``in_proj_bias``: rows [0, d) are q, [d, 2d) k, [2d, 3d) v; here they are three Dense
layers (their inputs differ: q and k carry position embeddings, v does not).

``DetrForObjectDetection`` checkpoints (keys ``model.backbone...``,
``class_labels_classifier``; the hub files' names and transformers 5's in-memory ones) are
renamed to the official keys, their separate q/k/v projections concatenated into
``in_proj_weight``.
"""

import re

import keras
import numpy as np

from keras_vit.convert.core import (
    _identity,
    _linear,
    layer_entries,
    register_layer_converter,
    register_state_dict_adapter,
    to_numpy,
)
from keras_vit.detection.detr import DetrDecoderLayer, DetrEncoderLayer, PositionalAttention


@register_layer_converter(PositionalAttention)
def _positional_attention(layer, path, options):
    d = layer.dim
    entries = []
    for i, proj in enumerate((layer.q_proj, layer.k_proj, layer.v_proj)):
        rows = slice(i * d, (i + 1) * d)
        entries.append((proj.kernel, f"{path}.in_proj_weight",
                        lambda a, rows=rows: _linear(a[rows])))
        entries.append((proj.bias, f"{path}.in_proj_bias", lambda a, rows=rows: a[rows]))
    return entries + layer_entries(layer.out_proj, f"{path}.out_proj", options)


_positional_attention.covers_sublayers = True


def _transformer_layer(layer, path, options):
    """Every sublayer under its own name, but the FFN's Linears as ``linear1`` / ``linear2``."""
    entries = []
    for sub in layer._layers:
        if sub is layer.mlp:
            entries += layer_entries(sub.fc1, f"{path}.linear1", options)
            entries += layer_entries(sub.fc2, f"{path}.linear2", options)
        else:
            entries += layer_entries(sub, f"{path}.{sub.name}", options)
    return entries


_transformer_layer.covers_sublayers = True
register_layer_converter(DetrEncoderLayer)(_transformer_layer)
register_layer_converter(DetrDecoderLayer)(_transformer_layer)


def _nested_model(layer, path, options):
    """A functional model used as a layer (DETR's ``backbone.0.body``): its layers under
    ``path.<layer name>``, as torch nests the modules."""
    return [entry for sub in layer.layers if not isinstance(sub, keras.layers.InputLayer)
            for entry in layer_entries(sub, f"{path}.{sub.name}", options)]


_nested_model.covers_sublayers = True
register_layer_converter(keras.src.models.functional.Functional)(_nested_model)


def _is_detr(model):
    return any(isinstance(layer, DetrDecoderLayer) for layer in model.layers)


# Hugging Face key -> official key, applied in order (transformers 5 and the hub files).
_HF_PATTERNS = tuple((re.compile(p), r) for p, r in (
    (r"^model\.backbone\.conv_encoder\.model\.", "backbone.0.body."),
    (r"^model\.backbone\.model\.", "backbone.0.body."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.encoder\.layers\.", "transformer.encoder.layers."),
    (r"^model\.decoder\.layers\.", "transformer.decoder.layers."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
    (r"\.encoder_attn\.", ".multihead_attn."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.(mlp\.)?fc1\.", ".linear1."),
    (r"\.(mlp\.)?fc2\.", ".linear2."),
    (r"(encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"(decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
))
_QKV = re.compile(r"^(.*\.(?:self_attn|multihead_attn))\.([qkv])_proj\.(weight|bias)$")


def hf_to_official(state_dict):
    renamed, qkv = {}, {}
    for key, value in state_dict.items():
        for pattern, repl in _HF_PATTERNS:
            key = pattern.sub(repl, key)
        m = _QKV.match(key)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = to_numpy(value)
            continue
        renamed[key] = value
    for (module, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{module}: q/k/v projections incomplete ({sorted(parts)})")
        renamed[f"{module}.in_proj_{kind}"] = np.concatenate([parts[c] for c in "qkv"], 0)
    # HF's frozen BatchNorm has no num_batches_tracked; nothing else HF keeps is unused.
    return renamed


@register_state_dict_adapter
def _detr_hf(model, state_dict):
    if not _is_detr(model) or "class_labels_classifier.weight" not in state_dict:
        return None
    return hf_to_official(state_dict)
