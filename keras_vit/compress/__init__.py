"""Compression that yields a smaller, ordinary Keras model (saves, loads, exports): the
survey's efficient-transformer techniques applied after (or during) training."""

from keras_vit.compress.heads import (count_heads, head_gate_gradients, head_importance,
                                     least_important_heads_removed, prune_heads,
                                     prune_heads_iteratively)
from keras_vit.compress.layers import every_other_block, keep_blocks, with_attention
from keras_vit.compress.low_rank import energy_for_fraction, energy_rank, factorize_dense
from keras_vit.compress.patch_slimming import (PatchSlimmedBlock, patch_slimming_schedule,
                                               slim_patches)
from keras_vit.compress.vtp import (GatedTransformerBlock, add_dimension_gates,
                                    dimension_gates, prune_dimensions)

__all__ = ["GatedTransformerBlock", "add_dimension_gates", "count_heads", "dimension_gates",
           "energy_for_fraction", "energy_rank", "every_other_block", "factorize_dense",
           "head_gate_gradients", "head_importance", "keep_blocks",
           "least_important_heads_removed", "prune_dimensions", "prune_heads",
           "prune_heads_iteratively", "PatchSlimmedBlock", "patch_slimming_schedule",
           "slim_patches", "with_attention"]
