"""Deformable DETR weights: the official (fundamentalvision/Deformable-DETR) state dict maps
by layer name; this module adds the converters of the layers with their own layout and the
adapter that renames Hugging Face's ``DeformableDetrForObjectDetection`` checkpoints (the
hub's ``save_pretrained`` names and transformers 5's ``state_dict()`` names) to the official
ones. The decoder's self-attention is DETR's ``PositionalAttention`` (its converter in
convert/detr.py splits the official ``in_proj_weight``); Hugging Face's q/k/v projections are
fused into it here, so that one naming reaches the layers.

Both namings repeat tensors: the official plain model's ``class_embed.0..5`` are one module,
box refinement's ``transformer.decoder.bbox_embed`` (two-stage: ``class_embed`` too) is the
same ModuleList as the top-level one; transformers ties the same copies. A repeated key whose
tensor equals the one the Keras model holds is dropped; a differing one stays and fails the
strict load (the checkpoint is not of this architecture).
"""

import re

import numpy as np

from keras_vit.convert.core import (
    _identity,
    register_layer_converter,
    register_state_dict_adapter,
    to_numpy,
)
from keras_vit.detection.deformable_detr import LevelMasks


@register_layer_converter(LevelMasks)
def _level_embed(layer, path, options):
    return [(layer.level_embed, path, _identity)]  # ``transformer.level_embed``


_HF_RENAMES = [
    (r"^model\.backbone\.(conv_encoder\.)?model\.", "backbone.0.body."),
    (r"^model\.input_proj\.", "input_proj."),
    (r"^model\.level_embed$", "transformer.level_embed"),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.",
     r"transformer.\1."),
    (r"^model\.(encoder|decoder)\.", r"transformer.\1."),
    (r"\.mlp\.fc", ".fc"),
    (r"(encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.encoder_attn\.", r"\1.cross_attn."),
    (r"(decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm1."),
    (r"(decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"\.fc1\.", ".linear1."),
    (r"\.fc2\.", ".linear2."),
    (r"\.self_attn\.(o_proj|out_proj)\.", ".self_attn.out_proj."),
]


def hf_to_official(state_dict):
    """Hugging Face names -> the official module paths; q/k/v projections of the decoder's
    self-attention fused into ``in_proj_weight`` / ``in_proj_bias`` (q, k, v order)."""
    out, qkv = {}, {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _HF_RENAMES:
            new = re.sub(pattern, repl, new)
        m = re.match(r"(.*\.self_attn)\.([qkv])_proj\.(weight|bias)$", new)
        if m and ".decoder." in new:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = to_numpy(value)
            continue
        out[new] = value
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}.in_proj_{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]])
    return out


def _drop_repeats(model, state_dict):
    """Drops the repeated head tensors (see the module docstring) the model holds once."""
    names = {layer.name for layer in model.layers}
    out = dict(state_dict)
    for key in list(out):
        m = re.match(r"^transformer\.decoder\.((class|bbox)_embed\..*)$", key)
        if m and m.group(1) not in out:  # saved once, under the decoder (tied) only
            out[m.group(1)] = out.pop(key)
            continue
        if m and np.array_equal(to_numpy(out[key]), to_numpy(out[m.group(1)])):
            del out[key]
            continue
        m = re.match(r"^(class|bbox)_embed\.(\d+)\.(.*)$", key)
        if (m and int(m.group(2)) > 0 and f"{m.group(1)}_embed.{m.group(2)}" not in names):
            first = f"{m.group(1)}_embed.0.{m.group(3)}"
            if first in out and np.array_equal(to_numpy(out[key]), to_numpy(out[first])):
                del out[key]
    return out


@register_state_dict_adapter
def deformable_detr_adapter(model, state_dict):
    if not any(layer.name == "transformer.level_embed" for layer in model.layers):
        return None
    if "model.level_embed" in state_dict:
        out = _drop_repeats(model, hf_to_official(state_dict))
        # transformers ties class_embed.1.. to class_embed.0 outside two-stage and
        # save_pretrained writes the first only: the tied heads are that one.
        for layer in model.layers:
            m = re.match(r"^class_embed\.(\d+)$", layer.name)
            if m and f"{layer.name}.weight" not in out and "class_embed.0.weight" in out:
                for kind in ("weight", "bias"):
                    out[f"{layer.name}.{kind}"] = out[f"class_embed.0.{kind}"]
        return out
    if "transformer.level_embed" in state_dict:
        return _drop_repeats(model, state_dict)
    return None
