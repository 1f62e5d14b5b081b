"""T2T-ViT: the official state dict's ``pos_embed`` -> FixedSinusoidPositionEmbedding.

Every other T2T-ViT weight maps by name (the layers mirror the official module
paths; the Performer's ``w`` is a plain layer weight). The position embedding
sits at the model's top level (``pos_embed``) and, when the checkpoint was made
for another image size, is resized as the official ``utils.resize_pos_embed``
does: the [CLS] row kept, the grid resized bicubically (torch's
``F.interpolate``, no antialias).
"""

from keras_vit.convert.core import register_layer_converter
from keras_vit.layers.embedding import resample_position_embedding
from keras_vit.models.t2t_vit import FixedSinusoidPositionEmbedding


@register_layer_converter(FixedSinusoidPositionEmbedding)
def _fixed_position_embedding(layer, path, options):
    top = path.rsplit(".", 1)[0] + "." if "." in path else ""

    def convert(a):
        if a.shape == tuple(layer.pos_embed.shape) or a.ndim != 3:
            return a
        return resample_position_embedding(a, layer.grid_size, layer.num_prefix_tokens,
                                           method="bicubic", antialias=False)

    return [(layer.pos_embed, top + "pos_embed", convert)]
