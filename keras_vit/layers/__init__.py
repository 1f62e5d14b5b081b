"""Building blocks shared by every family: keras.ops only, each registered and serializable."""

from keras_vit.layers.attention import MultiHeadAttention
from keras_vit.layers.blocks import ResidualBlock, TransformerBlock, TransformerDecoderBlock
from keras_vit.layers.common import (BatchNorm, LayerNorm, Linear, activation, batch_norm, dense,
                                     layer_norm)
from keras_vit.layers.deformable_attention import MultiScaleDeformableAttention
from keras_vit.layers.efficient_attention import LinearAttention, TopKAttention
from keras_vit.layers.embedding import (
    MapPositionEmbedding,
    PatchEmbed,
    PositionEmbedding,
    PrefixTokens,
    SinusoidalPositionEmbedding,
    resample_position_embedding,
    resize_grid,
    sinusoid_table,
    sinusoid_table_2d,
)
from keras_vit.layers.mlp import Mlp
from keras_vit.layers.pooling import TokenPool, TokensToMap
from keras_vit.layers.regularization import DropPath, LayerScale
from keras_vit.layers.spatial_reduction import SpatialReductionAttention

__all__ = [
    "BatchNorm", "DropPath", "LayerNorm", "LayerScale", "Linear", "LinearAttention", "MapPositionEmbedding", "Mlp", "MultiHeadAttention", "MultiScaleDeformableAttention", "PatchEmbed", "PositionEmbedding",
    "PrefixTokens", "ResidualBlock", "SinusoidalPositionEmbedding", "SpatialReductionAttention", "TokenPool", "TokensToMap", "TopKAttention", "TransformerBlock", "TransformerDecoderBlock",
    "activation", "batch_norm", "dense", "layer_norm", "resample_position_embedding", "resize_grid",
    "sinusoid_table", "sinusoid_table_2d",
]
