"""Reading a built ViT-style model from the inside: its global self-attention blocks, their
query/key/value and attention probabilities recomputed from a block's input with the block's
own weights, and its prefix (class, distillation) tokens.

Used by apps/visualize.py (attention rollout) and keras_vit/training/distillation.py (MiniLM
and manifold distillation). Not a model family: it registers nothing.
"""

import math

from keras import ops

from keras_vit.layers.attention import softmax_float32


def global_attention_blocks(model):
    """The model's blocks of plain multi-head self-attention over one token sequence
    (ResidualBlocks whose mixer is keras_vit's MultiHeadAttention), in order, when every one
    of them sees the same number of tokens; [] otherwise (windows, spatial reduction, ...)."""
    from keras_vit.layers.attention import MultiHeadAttention
    from keras_vit.layers.blocks import ResidualBlock

    blocks = [layer for layer in getattr(model, "layers", [])
              if isinstance(layer, ResidualBlock)
              and type(layer.attn) is MultiHeadAttention and not layer.attn.cross]
    try:
        shapes = {tuple(block.input.shape[1:]) for block in blocks}
    except (AttributeError, ValueError):  # a block called more than once: no single input
        return []
    return blocks if len(shapes) == 1 and len(next(iter(shapes))) == 2 else []


def block_qkv(block, x):
    """q, k, v of ``block``'s self-attention, each (B, heads, N, head_dim), from the block's
    input ``x`` (through norm1 first when the block is pre-norm)."""
    h = block.norm1(x) if block.norm_first else x
    return block.attn.project_qkv(h)


def block_attention(block, x):
    """The attention probabilities softmax(q k^T * scale) (B, heads, N, N) ``block`` computes
    on its input ``x`` (no bias or mask: plain global attention blocks have none)."""
    q, k, _ = block_qkv(block, x)
    logits = ops.matmul(q * ops.cast(block.attn.scale, q.dtype), ops.transpose(k, (0, 1, 3, 2)))
    return softmax_float32(logits)


def prefix_tokens(model, num_tokens):
    """(number of prefix tokens, whether the model reads the class token): from its
    TokenPool layer, else whatever is left over a square patch grid."""
    from keras_vit.layers.pooling import TokenPool

    for layer in getattr(model, "layers", []):
        if isinstance(layer, TokenPool):
            return layer.num_prefix_tokens, layer.mode == "token"
    prefix = num_tokens - math.isqrt(num_tokens) ** 2
    return prefix, prefix > 0
