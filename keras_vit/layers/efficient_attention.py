"""The survey's efficient token mixers, each a drop-in for ``MultiHeadAttention``: the same
``qkv`` and ``proj`` weights (a dense model's weights load into them), another ``attend``.

- ``LinearAttention`` (Katharopoulos et al. 2020, "Transformers are RNNs"): softmax(QK^T)V
  replaced by phi(Q) (phi(K)^T V) / (phi(Q) sum_j phi(K_j)), phi(x) = elu(x) + 1: O(N d^2)
  instead of O(N^2 d); ``causal=True`` uses running sums over the keys (the decoder form).
- ``TopKAttention`` (KVT, Wang et al. 2021): each query keeps its k largest scores; the
  others get no weight. Still O(N^2) to score, but the weights are sparse.
"""

import keras
from keras import ops

from keras_vit.layers.attention import MultiHeadAttention, masked_logits


def elu_feature_map(x):
    """phi(x) = elu(x) + 1 > 0: the positive feature map of linear attention."""
    return ops.elu(x) + 1.0


@keras.saving.register_keras_serializable(package="keras_vit")
class LinearAttention(MultiHeadAttention):
    """Multi-head linear attention. ``eps`` keeps the normaliser away from zero (the
    reference's 1e-6). Masks and additive biases have no place in the factorised form: a
    call with either is an error. ``causal=True``: query i sees keys j <= i."""

    def __init__(self, dim, num_heads=8, causal=False, eps=1e-6, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.causal, self.eps = bool(causal), float(eps)

    def attend(self, q, k, v, mask=None, bias=None, training=None):
        if mask is not None or bias is not None:
            raise ValueError("linear attention takes no attention mask or bias (use "
                             "causal=True for the decoder's mask)")
        q, k = elu_feature_map(q), elu_feature_map(k)
        if self.causal:  # running sums: the i-th row sees keys 0..i
            kv = ops.cumsum(k[..., :, None] * v[..., None, :], axis=2)  # (B, H, N, d, d)
            numerator = ops.sum(q[..., :, None] * kv, axis=-2)
            normaliser = ops.sum(q * ops.cumsum(k, axis=2), axis=-1, keepdims=True)
        else:
            kv = ops.matmul(ops.transpose(k, (0, 1, 3, 2)), v)  # (B, H, d, d)
            numerator = ops.matmul(q, kv)
            key_sum = ops.transpose(ops.sum(k, axis=2, keepdims=True), (0, 1, 3, 2))
            normaliser = ops.matmul(q, key_sum)  # (B, H, N, 1)
        return numerator / (normaliser + self.eps)

    def get_config(self):
        return {**super().get_config(), "causal": self.causal, "eps": self.eps}


@keras.saving.register_keras_serializable(package="keras_vit")
class TopKAttention(MultiHeadAttention):
    """Softmax attention over each query's ``k`` largest scores (KVT's k-NN attention);
    ``k`` at least the number of keys is dense attention."""

    def __init__(self, dim, num_heads=8, k=16, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        if int(k) < 1:
            raise ValueError(f"top-k attention needs k >= 1, got {k}")
        self.k = int(k)

    def attend(self, q, k, v, mask=None, bias=None, training=None):
        logits = self.scores(q, k, mask, bias)
        keys = logits.shape[-1]
        if keys is None or self.k < keys:
            kept = ops.top_k(logits, min(self.k, keys) if keys else self.k, sorted=True)[0]
            logits = masked_logits(logits, logits >= kept[..., -1:])  # ties at the k-th stay
        attn = self.attn_dropout(ops.softmax(logits, axis=-1), training=training)
        return ops.matmul(attn, v)

    def get_config(self):
        return {**super().get_config(), "k": self.k}


ATTENTIONS = {"dense": MultiHeadAttention, "linear": LinearAttention, "topk": TopKAttention}


def attention_mixer(kind, dim, num_heads, **kwargs):
    """The token mixer ``kind`` (ATTENTIONS) with MultiHeadAttention's arguments and the
    kind's own (``k`` of top-k, ``causal`` of linear attention)."""
    if kind not in ATTENTIONS:
        raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {kind!r}")
    return ATTENTIONS[kind](dim, num_heads, **kwargs)
