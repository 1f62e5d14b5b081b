"""SegFormer: the official checkpoints' nested depthwise conv and unused head conv, and
Hugging Face transformers' naming renamed to the official one.

The Keras layers mirror the official module paths (NVlabs/SegFormer, mmseg
``EncoderDecoder``), except that the Mix-FFN's depthwise conv is one module
deeper there (``mlp.dwconv.dwconv``: the ``DWConv`` wrapper); the block's
converter says so. Official checkpoints also hold ``decode_head.conv_seg``, the
classifier mmseg's ``BaseDecodeHead`` creates and ``SegFormerHead`` never uses
(it has ``linear_pred``): it is dropped.

Hugging Face checkpoints (``SegformerForSemanticSegmentation``, keys starting
with ``segformer.``) are renamed: the hub files' names (``segformer.encoder.block.0.0.
attention.self.query``, as ``save_pretrained`` still writes them) and the in-memory
names of transformers 5 (``segformer.stages.0.blocks.0.attention.q_proj``); their
separate key and value Linears are concatenated into the official ``kv``.
"""

import re

import numpy as np

from keras_vit.convert.core import (
    layer_entries,
    register_layer_converter,
    register_state_dict_adapter,
    to_numpy,
)
from keras_vit.segmentation.segformer import MixTransformerBlock

# A layer only SegFormer models have: the adapter leaves other families' checkpoints alone.
_SEGFORMER_LAYER = "decode_head.linear_fuse.conv"
_UNUSED_OFFICIAL = "decode_head.conv_seg."


def _stage(m, offset=1):
    return str(int(m) + offset)


# Hugging Face key -> official key, applied in order; both transformers namings.
_HF_PATTERNS = tuple((re.compile(p), r) for p, r in (
    # transformers 5's module paths, first to the hub files' (4.x) ones ...
    (r"^segformer\.stages\.(\d+)\.patch_embeddings\.", r"segformer.encoder.patch_embeddings.\1."),
    (r"^segformer\.stages\.(\d+)\.blocks\.", r"segformer.encoder.block.\1."),
    (r"^segformer\.stages\.(\d+)\.layer_norm\.", r"segformer.encoder.layer_norm.\1."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
    (r"\.mlp\.fc1\.", ".mlp.dense1."),
    (r"\.mlp\.fc2\.", ".mlp.dense2."),
    (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
    # ... then the hub files' names to the official ones.
    (r"^segformer\.encoder\.patch_embeddings\.(\d+)\.layer_norm\.",
     lambda m: f"backbone.patch_embed{_stage(m[1])}.norm."),
    (r"^segformer\.encoder\.patch_embeddings\.(\d+)\.",
     lambda m: f"backbone.patch_embed{_stage(m[1])}."),
    (r"^segformer\.encoder\.block\.(\d+)\.", lambda m: f"backbone.block{_stage(m[1])}."),
    (r"^segformer\.encoder\.layer_norm\.(\d+)\.", lambda m: f"backbone.norm{_stage(m[1])}."),
    (r"\.layer_norm_1\.", ".norm1."),
    (r"\.layer_norm_2\.", ".norm2."),
    (r"\.attention\.self\.query\.", ".attn.q."),
    (r"\.attention\.self\.key\.", ".attn.k."),
    (r"\.attention\.self\.value\.", ".attn.v."),
    (r"\.attention\.self\.sr\.", ".attn.sr."),
    (r"\.attention\.self\.layer_norm\.", ".attn.norm."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"^decode_head\.linear_c\.(\d+)\.", lambda m: f"decode_head.linear_c{_stage(m[1])}."),
    (r"^decode_head\.linear_fuse\.(weight|bias)$", r"decode_head.linear_fuse.conv.\1"),
    (r"^decode_head\.batch_norm\.", "decode_head.linear_fuse.bn."),
    (r"^decode_head\.classifier\.", "decode_head.linear_pred."),
))
_KEY_OR_VALUE = re.compile(r"^(.*\.attn)\.([kv])\.(weight|bias)$")


def segformer_hf_to_official(state_dict):
    """A Hugging Face ``SegformerForSemanticSegmentation`` state dict (either naming) with
    the official SegFormer keys; key and value Linears joined into ``kv`` ([k; v] rows, the
    official ``kv(x).reshape(B, N, 2, heads, d)`` order). Keys it does not know pass
    through unchanged (a strict load then lists them)."""
    out, halves = {}, {}
    for key, value in state_dict.items():
        for pattern, repl in _HF_PATTERNS:
            key = pattern.sub(repl, key)
        m = _KEY_OR_VALUE.match(key)
        if m:
            halves.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            out[key] = value
    for (attn, param), kv in halves.items():
        if set(kv) != {"k", "v"}:  # one half alone: leave it for the strict load to report
            out.update({f"{attn}.{h}.{param}": v for h, v in kv.items()})
            continue
        out[f"{attn}.kv.{param}"] = np.concatenate([to_numpy(kv["k"]), to_numpy(kv["v"])], 0)
    return out


@register_state_dict_adapter
def _segformer_checkpoint(model, state_dict):
    if not any(layer.name == _SEGFORMER_LAYER for layer in model.layers):
        return None
    if any(key.startswith("segformer.") for key in state_dict):
        return segformer_hf_to_official(state_dict)
    if any(key.startswith(_UNUSED_OFFICIAL) for key in state_dict):
        return {k: v for k, v in state_dict.items() if not k.startswith(_UNUSED_OFFICIAL)}
    return None


def _mix_transformer_block(layer, path, options):
    entries = []
    for sub in layer._layers:
        for var, key, convert in layer_entries(sub, f"{path}.{sub.name}", options):
            if key.startswith(f"{path}.mlp.dwconv."):
                key = key.replace(".mlp.dwconv.", ".mlp.dwconv.dwconv.", 1)
            entries.append((var, key, convert))
    return entries


_mix_transformer_block.covers_sublayers = True
register_layer_converter(MixTransformerBlock)(_mix_transformer_block)
