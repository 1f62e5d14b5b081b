"""TNT: timm's ``patch_pos`` ([CLS] + patch grid, resampled for another image size as timm's
checkpoint filter does). ``pixel_pos`` is a ``MapPositionEmbedding`` (see ``convert/pit.py``)."""

from keras_vit.convert.core import register_layer_converter
from keras_vit.layers.embedding import resample_position_embedding
from keras_vit.models.tnt import PatchPosition


@register_layer_converter(PatchPosition)
def _patch_position(layer, path, options):
    top = path.rsplit(".", 1)[0] + "." if "." in path else ""

    def convert(a):
        if a.shape == tuple(layer.pos_embed.shape) or a.ndim != 3:
            return a
        return resample_position_embedding(a, layer.grid_size, layer.num_prefix_tokens,
                                           method=options.get("interpolation", "bicubic"),
                                           antialias=options.get("antialias", True))

    return [(layer.pos_embed, top + "patch_pos", convert)]
