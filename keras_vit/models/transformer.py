"""The encoder-decoder transformer of the survey's formulation (Vaswani et al. 2017).

Token embedding + sinusoidal position encoding, a stack of encoder blocks, a
stack of decoder blocks (masked self-attention, cross-attention whose queries
come from the decoder and keys/values from the encoder), a final linear layer
whose softmax gives the next-token distribution. Blocks are Post-LN by default,
as in the original paper; ``norm_first=True`` gives Pre-LN. Token 0 is padding.
"""

import keras
import numpy as np
from keras import ops

from keras_vit.layers import (
    SinusoidalPositionEmbedding,
    TransformerBlock,
    TransformerDecoderBlock,
    dense,
    layer_norm,
)

PAD = 0


@keras.saving.register_keras_serializable(package="keras_vit")
class PaddingMask(keras.layers.Layer):
    """Token ids (B, L) -> boolean key mask (B, 1, 1, L), False at padding."""

    def call(self, tokens):
        return ops.expand_dims(ops.not_equal(tokens, PAD), (1, 2))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1, 1, input_shape[1])


@keras.saving.register_keras_serializable(package="keras_vit")
class ScaledEmbedding(keras.layers.Embedding):
    """Token embedding multiplied by sqrt(d_model), as the original transformer."""

    def call(self, inputs):
        return super().call(inputs) * ops.cast(self.output_dim ** 0.5, self.compute_dtype)


def _embed(tokens, vocab_size, dim, dropout, name):
    x = ScaledEmbedding(vocab_size, dim, name=f"{name}_embed")(tokens)
    x = SinusoidalPositionEmbedding(name=f"{name}_pos")(x)
    return keras.layers.Dropout(dropout, name=f"{name}_drop")(x)


def seq2seq_transformer(*, src_vocab_size, tgt_vocab_size, dim=512, num_heads=8,
                        encoder_depth=6, decoder_depth=6, mlp_ratio=4.0, dropout=0.1,
                        norm_first=False, name="transformer"):
    """Builds Model([src_tokens, tgt_tokens]) -> next-token logits (B, L_tgt, tgt_vocab).

    Sequences have any length; token 0 is padding and is masked out of
    attention. Decode with ``greedy_decode``.
    """
    src = keras.Input((None,), dtype="int32", name="src_tokens")
    tgt = keras.Input((None,), dtype="int32", name="tgt_tokens")
    src_mask = PaddingMask(name="src_mask")(src)
    block_args = dict(mlp_ratio=mlp_ratio, drop=dropout, attn_drop=dropout,
                      norm_first=norm_first, norm_eps=1e-5, act="relu")

    memory = _embed(src, src_vocab_size, dim, dropout, "encoder")
    for i in range(encoder_depth):
        memory = TransformerBlock(dim, num_heads, name=f"encoder.layers.{i}", **block_args)(
            memory, attention_mask=src_mask)
    if norm_first:  # Pre-LN stacks need a final norm; Post-LN blocks end with one
        memory = layer_norm(1e-5, name="encoder.norm")(memory)

    x = _embed(tgt, tgt_vocab_size, dim, dropout, "decoder")
    tgt_mask = PaddingMask(name="tgt_mask")(tgt)
    for i in range(decoder_depth):
        x = TransformerDecoderBlock(dim, num_heads, causal=True, name=f"decoder.layers.{i}",
                                    **block_args)(x, memory, self_mask=tgt_mask,
                                                  memory_mask=src_mask)
    if norm_first:
        x = layer_norm(1e-5, name="decoder.norm")(x)
    logits = dense(tgt_vocab_size, name="generator")(x)
    return keras.Model([src, tgt], logits, name=name)


def transformer_encoder(model):
    """The encoder half of a ``seq2seq_transformer``: src_tokens -> memory (B, L, D)."""
    last = [layer for layer in model.layers if layer.name.startswith("encoder.")][-1]
    return keras.Model(model.get_layer("src_tokens").output, last.output, name="encoder")


def greedy_decode(model, src_tokens, max_len, bos_id, pad_id=PAD):
    """Autoregressive greedy decoding: (B, L_src) ints -> (B, max_len) predicted tokens.

    The target is one fixed-length buffer (BOS, the tokens so far, then ``pad_id``), so every
    step runs the same traced function: the decoder is causal, so position t reads only the
    tokens before it (a growing target retraced the model once per length)."""
    src_tokens = np.asarray(src_tokens, dtype=np.int32)
    target = np.full((src_tokens.shape[0], max_len), pad_id, dtype=np.int32)
    target[:, 0] = bos_id
    decoded = np.empty_like(target)
    for t in range(max_len):
        logits = np.asarray(model.predict_on_batch([src_tokens, target]))
        decoded[:, t] = logits[:, t].argmax(-1)
        if t + 1 < max_len:
            target[:, t + 1] = decoded[:, t]
    return decoded
