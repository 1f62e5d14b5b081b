"""Compression that yields a smaller, ordinary Keras model (saves, loads, exports): the
survey's efficient-transformer techniques applied after (or during) training."""

from keras_vit.compress.layers import every_other_block, keep_blocks

__all__ = ["every_other_block", "keep_blocks"]
