"""T2T-ViT: the official state dict's ``pos_embed`` -> FixedSinusoidPositionEmbedding.

Every other T2T-ViT weight maps by name (the layers mirror the official module
paths; the Performer's ``w`` is a plain layer weight). The position embedding
sits at the model's top level (``pos_embed``) and, when the checkpoint was made
for another image size, is resized as the official ``utils.resize_pos_embed``
does: the [CLS] row kept, the grid resized bicubically (torch's
``F.interpolate``, no antialias).
"""

from keras_vit.convert.core import position_embedding_converter, register_layer_converter
from keras_vit.models.t2t_vit import FixedSinusoidPositionEmbedding

register_layer_converter(FixedSinusoidPositionEmbedding)(
    position_embedding_converter("pos_embed", interpolation="bicubic", antialias=False))
