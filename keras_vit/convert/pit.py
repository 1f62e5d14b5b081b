"""PiT: timm's NCHW position embedding on the map -> the Keras (1, H, W, C) weight.

timm's ``pos_embed`` of ``PoolingVisionTransformer`` is (1, C, H, W). A checkpoint
made for another image size is resized as timm resizes position embeddings
(``resample_abs_pos_embed``: bicubic with antialias by default). TNT's
``pixel_pos`` uses the same layer, so the key is the layer's own path.
"""

import numpy as np

from keras_vit.convert.core import register_layer_converter
from keras_vit.layers.embedding import resize_grid
from keras_vit.models.pit import MapPositionEmbedding


@register_layer_converter(MapPositionEmbedding)
def _map_position_embedding(layer, path, options):
    target = tuple(layer.pos_embed.shape)

    def convert(a):
        if a.ndim != 4:
            raise ValueError(f"expected a (1, C, H, W) embedding, got {a.shape}")
        grid = np.transpose(a[0], (1, 2, 0))
        if grid.shape[:2] != target[1:3]:
            grid = resize_grid(grid, target[1:3], method=options.get("interpolation", "bicubic"),
                               antialias=options.get("antialias", True))
        return grid[None].astype(np.float32)

    return [(layer.pos_embed, path, convert)]
