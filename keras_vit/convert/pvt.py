"""PVT: the official v1 checkpoint's ``pos_embedN`` parameters; official v2 names to timm's.

Every other PVT v1 / v2 weight maps by name in ``core``. The official model
keeps its per-stage position embeddings at the model's top level
(``pos_embed1`` ... ``pos_embed4``), the key being the Keras layer's own name.
A checkpoint made for another grid is resized as the official forward does
at run time (``F.interpolate(mode="bilinear")``: align_corners=False, no
antialias), whatever interpolation ``load_timm_weights`` is given, so the
Keras model reproduces the official one at any input size. The last stage's
[CLS] position is kept as is.
"""

import math
import re

from keras_vit.convert.core import register_layer_converter
from keras_vit.layers.embedding import resample_position_embedding
from keras_vit.models.pvt import PvtPositionEmbedding


@register_layer_converter(PvtPositionEmbedding)
def _pvt_position_embedding(layer, path, options):
    prefix = layer.num_prefix_tokens

    def convert(a):
        if a.shape == tuple(layer.pos_embed.shape) or a.ndim != 3:
            return a
        side = math.isqrt(a.shape[1] - prefix)
        if side * side != a.shape[1] - prefix:
            raise ValueError(f"cannot resize a {a.shape[1] - prefix}-position embedding (not a "
                             f"square grid) to {layer.grid_size}")
        return resample_position_embedding(a, layer.grid_size, prefix, old_grid=(side, side),
                                           method="bilinear", antialias=False)

    return [(layer.pos_embed, path, convert)]


_V2_PATTERNS = (
    (re.compile(r"^patch_embed1\."), lambda m: "patch_embed."),
    (re.compile(r"^patch_embed(\d+)\."), lambda m: f"stages.{int(m[1]) - 1}.downsample."),
    (re.compile(r"^block(\d+)\.(\d+)\."), lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (re.compile(r"^norm(\d+)\."), lambda m: f"stages.{int(m[1]) - 1}.norm."),
    (re.compile(r"\.dwconv\.dwconv\."), lambda m: ".dwconv."),
)


def pvt_v2_official_to_timm(state_dict):
    """An official PVT v2 state dict (whai362/PVT ``classification/pvt_v2.py``: ``patch_embed2``,
    ``block1.0``, ``norm4``, ``mlp.dwconv.dwconv``) renamed to timm's layout, which the
    Keras model's layer names follow. A timm-layout dict passes through unchanged."""
    if any(k.startswith(("stages.", "patch_embed.")) for k in state_dict):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _V2_PATTERNS:
            key = pattern.sub(repl, key)
        out[key] = value
    return out
