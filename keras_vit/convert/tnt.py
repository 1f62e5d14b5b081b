"""TNT: timm's ``patch_pos`` ([CLS] + patch grid, resampled for another image size as timm's
checkpoint filter does) and the block layout. ``pixel_pos`` is a ``MapPositionEmbedding``,
converted in ``core``."""

from keras_vit.convert.core import (
    layer_entries,
    position_embedding_converter,
    register_layer_converter,
)
from keras_vit.models.tnt import PatchPosition, TntBlock

register_layer_converter(PatchPosition)(position_embedding_converter("patch_pos"))


@register_layer_converter(TntBlock)
def _tnt_block(layer, path, options):
    # timm's Block holds the inner and outer transformers' layers itself: the two
    # ResidualBlocks add no level to the keys (blocks.0.norm_in, blocks.0.mlp, ...).
    transformers = (layer.inner, layer.outer)
    return [entry for sub in layer._layers
            for entry in layer_entries(sub, path if any(sub is t for t in transformers)
                                       else f"{path}.{sub.name}", options)]


_tnt_block.covers_sublayers = True
