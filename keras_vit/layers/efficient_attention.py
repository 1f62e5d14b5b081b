"""The survey's efficient token mixers, each a drop-in for ``MultiHeadAttention`` in a block.
The attention variants keep its ``qkv`` and ``proj`` weights (a dense model's weights load
into them) and replace ``attend``; LSRA has weights of its own.

- ``LinearAttention`` (Katharopoulos et al. 2020, "Transformers are RNNs"): softmax(QK^T)V
  replaced by phi(Q) (phi(K)^T V) / (phi(Q) sum_j phi(K_j)), phi(x) = elu(x) + 1: O(N d^2)
  instead of O(N^2 d); ``causal=True`` uses running sums over the keys (the decoder form).
- ``TopKAttention`` (KVT, Wang et al. 2021): each query keeps its k largest scores; the
  others get no weight. Still O(N^2) to score, but the weights are sparse.
- ``BigBirdAttention`` (Zaheer et al. 2020): block-sparse, window + global + random blocks.
- ``LongShortRangeAttention`` (Lite Transformer, Wu et al. 2020): half the channels through
  attention, half through a GLU + lightweight convolution branch (weights of its own).
- ``HamburgerMixer`` (Geng et al. 2021): global context by NMF of the token matrix.
"""

import keras
import numpy as np
from keras import ops

from keras_vit.layers.attention import MultiHeadAttention, masked_logits, softmax_float32
from keras_vit.layers.common import dense


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
        attn = self.attn_dropout(softmax_float32(logits), training=training)
        return ops.matmul(attn, v)

    def get_config(self):
        return {**super().get_config(), "k": self.k}


def bigbird_key_blocks(num_blocks, window=3, num_global=1, num_random=2, seed=0):
    """(blocks, kept): for every query block the key blocks it attends to under BigBird's
    ITC pattern, as a (num_blocks, K) index array and a (num_blocks, K) bool array (False:
    a filler slot, masked). Global query blocks (the first ``num_global``) see every block;
    the others see the global blocks, the ``window`` blocks around them and ``num_random``
    others drawn without repetition from the rest with ``seed`` (fixed at build time, so
    every call and every exported file uses the same pattern)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_blocks):
        if i < num_global:
            rows.append(list(range(num_blocks)))
            continue
        half = window // 2
        near = [j for j in range(i - half, i + half + 1) if 0 <= j < num_blocks]
        fixed = sorted(set(range(min(num_global, num_blocks))) | set(near))
        rest = [j for j in range(num_blocks) if j not in fixed]
        rows.append(fixed + sorted(rng.choice(rest, min(num_random, len(rest)),
                                              replace=False).tolist()))
    width = max(len(r) for r in rows)
    blocks = np.array([r + [r[0]] * (width - len(r)) for r in rows], np.int32)
    kept = np.array([[k < len(r) for k in range(width)] for r in rows])
    return blocks, kept


@keras.saving.register_keras_serializable(package="keras_vit")
class BigBirdAttention(MultiHeadAttention):
    """BigBird's block-sparse attention (Zaheer et al. 2020, ITC): tokens in blocks of
    ``block_size``; a query block attends to the global blocks, a sliding window of
    ``window`` blocks and ``num_random`` random blocks (seeded), gathered so the cost is
    O(N x keys per block); global blocks attend to everything (dense rows of their own). The
    sequence is padded to whole blocks (padding keys masked). Masks and biases are not
    taken."""

    def __init__(self, dim, num_heads=8, block_size=16, window=3, num_global=1,
                 num_random=2, seed=0, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.block_size, self.window = int(block_size), int(window)
        self.num_global, self.num_random, self.seed = int(num_global), int(num_random), int(seed)

    def pattern(self, length):
        """(key blocks, kept slots, blocks) for a sequence of ``length`` tokens."""
        num_blocks = -(-length // self.block_size)
        blocks, kept = bigbird_key_blocks(num_blocks, self.window, self.num_global,
                                          self.num_random, self.seed)
        return blocks, kept, num_blocks

    def attend(self, q, k, v, mask=None, bias=None, training=None):
        if mask is not None or bias is not None:
            raise ValueError("BigBird attention takes no attention mask or bias")
        length, heads, d, b = q.shape[2], self.num_heads, self.head_dim, self.block_size
        if length is None:
            raise ValueError("BigBird attention needs a static sequence length")
        blocks, kept, num_blocks = self.pattern(length)
        pad = num_blocks * b - length

        def blocked(t):  # (B, H, N, d) -> (B*H, blocks, b, d), zero padded
            t = ops.pad(t, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else t
            return ops.reshape(t, (-1, num_blocks, b, d))

        qb, kb, vb = blocked(q * ops.cast(self.scale, q.dtype)), blocked(k), blocked(v)
        glob = min(self.num_global, num_blocks)
        key_ok = np.arange(num_blocks * b) < length  # padding keys masked
        parts = []
        if glob:  # global query blocks: every key, one dense product
            keys_all = ops.reshape(kb, (-1, 1, num_blocks * b, d))
            values_all = ops.reshape(vb, (-1, 1, num_blocks * b, d))
            queries = ops.reshape(qb[:, :glob], (-1, 1, glob * b, d))
            logits = masked_logits(ops.matmul(queries, ops.transpose(keys_all, (0, 1, 3, 2))),
                                   key_ok[None, None, None, :])
            attn = self.attn_dropout(softmax_float32(logits), training=training)
            parts.append(ops.reshape(ops.matmul(attn, values_all), (-1, glob, b, d)))
        if glob < num_blocks:  # the others: their few key blocks gathered, O(N) in all
            rows, row_kept = blocks[glob:], kept[glob:]
            width = int(row_kept.sum(axis=1).max())
            rows, row_kept = rows[:, :width], row_kept[:, :width]
            sparse = num_blocks - glob
            # every key slot of every query block: real, not padding, not a filler
            slot_ok = np.repeat(row_kept, b, axis=1) & key_ok[
                (rows[:, :, None] * b + np.arange(b)[None, None, :]).reshape(sparse, -1)]

            def gathered(t):  # each query block's key blocks side by side: (BH, n, K*b, d)
                return ops.reshape(ops.take(t, rows.reshape(-1), axis=1),
                                   (-1, sparse, width * b, d))

            keys, values = gathered(kb), gathered(vb)
            logits = ops.matmul(qb[:, glob:], ops.transpose(keys, (0, 1, 3, 2)))
            logits = masked_logits(logits, slot_ok[None, :, None, :])
            attn = self.attn_dropout(softmax_float32(logits), training=training)
            parts.append(ops.matmul(attn, values))
        out = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=1)
        out = ops.reshape(out, (-1, heads, num_blocks * b, d))
        return out[:, :, :length] if pad else out

    def get_config(self):
        return {**super().get_config(), "block_size": self.block_size, "window": self.window,
                "num_global": self.num_global, "num_random": self.num_random,
                "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_vit")
class LongShortRangeAttention(keras.layers.Layer):
    """Lite Transformer's long-short range attention (LSRA, Wu et al. 2020): the channels
    split in two halves; the first goes through multi-head attention (global context), the
    second through the convolution branch (local context: a linear layer to twice its
    width, GLU, a lightweight convolution over the tokens, a linear layer); the two halves
    are concatenated (the block's MLP mixes them). The lightweight convolution is
    depthwise, ``kernel_size`` taps softmax-normalised and shared by the channels of each of
    ``conv_heads`` groups (fairseq's LightweightConv, weight_softmax=True), zero-padded to
    keep the length. Its weights are its own, not the dense layer's."""

    def __init__(self, dim, num_heads=8, kernel_size=3, conv_heads=None, qkv_bias=True,
                 attn_drop=0.0, proj_drop=0.0, **kwargs):
        super().__init__(**kwargs)
        if dim % 2 or (dim // 2) % num_heads:
            raise ValueError(f"LSRA splits dim {dim} in halves of whole heads: dim/2 must "
                             f"be divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.kernel_size = int(dim), int(num_heads), int(kernel_size)
        self.conv_heads = int(conv_heads or num_heads)
        half = self.dim // 2
        if half % self.conv_heads:
            raise ValueError(f"dim/2 {half} must be divisible by conv_heads {self.conv_heads}")
        self.qkv_bias, self.attn_drop, self.proj_drop = bool(qkv_bias), attn_drop, proj_drop
        self.attn = MultiHeadAttention(half, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                       proj_drop=proj_drop, name="attn")
        self.conv_in = dense(2 * half, name="conv_in")  # GLU: values and gates
        self.conv_out = dense(half, name="conv_out")

    def build(self, x_shape, *args):
        half = self.dim // 2
        branch = tuple(x_shape[:-1]) + (half,)
        self.attn.build(branch)
        self.conv_in.build(branch)
        self.conv_out.build(branch)
        self.conv_weight = self.add_weight(name="conv_weight",
                                           shape=(self.conv_heads, self.kernel_size),
                                           initializer="glorot_uniform")

    def lightweight_conv(self, x):
        """(B, N, C) -> (B, N, C): per channel group, softmax(taps) convolved over tokens."""
        channels = x.shape[-1]
        taps = softmax_float32(self.conv_weight)  # (heads, K)
        kernel = ops.repeat(ops.transpose(taps), channels // self.conv_heads, axis=1)
        kernel = ops.reshape(kernel, (self.kernel_size, 1, channels, 1))
        out = ops.depthwise_conv(ops.expand_dims(x, 2), kernel, padding="same")
        return ops.squeeze(out, 2)

    def call(self, x, attention_mask=None, bias=None, training=None):
        half = self.dim // 2
        global_part = self.attn(x[..., :half], attention_mask=attention_mask, bias=bias,
                                training=training)
        values_gates = self.conv_in(x[..., half:])
        local = values_gates[..., :half] * ops.sigmoid(values_gates[..., half:])  # GLU
        local = self.conv_out(self.lightweight_conv(local))
        return ops.concatenate([global_part, local], axis=-1)

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "kernel_size": self.kernel_size, "conv_heads": self.conv_heads,
                "qkv_bias": self.qkv_bias, "attn_drop": self.attn_drop,
                "proj_drop": self.proj_drop}


def nmf_multiplicative(x, bases, steps, inv_t=1.0, eps=1e-6):
    """Non-negative matrix factorisation x ~ bases @ codes^T by Lee-Seung multiplicative
    updates, Hamburger's "ham" (Geng et al. 2021): x (B, d, N) >= 0, bases (B, d, R) >= 0;
    codes start as softmax(inv_t * x^T bases) over R, then ``steps`` rounds update codes
    then bases, and a last codes update. Returns the reconstruction bases @ codes^T."""
    codes = softmax_float32(inv_t * ops.matmul(ops.transpose(x, (0, 2, 1)), bases))

    def update_codes(codes, bases):
        numerator = ops.matmul(ops.transpose(x, (0, 2, 1)), bases)  # (B, N, R)
        denominator = ops.matmul(codes, ops.matmul(ops.transpose(bases, (0, 2, 1)), bases))
        return codes * numerator / (denominator + eps)

    for _ in range(steps):
        codes = update_codes(codes, bases)
        numerator = ops.matmul(x, codes)  # (B, d, R)
        denominator = ops.matmul(bases, ops.matmul(ops.transpose(codes, (0, 2, 1)), codes))
        bases = bases * numerator / (denominator + eps)
    codes = update_codes(codes, bases)
    return ops.matmul(bases, ops.transpose(codes, (0, 2, 1)))


@keras.saving.register_keras_serializable(package="keras_vit")
class HamburgerMixer(keras.layers.Layer):
    """Hamburger (Geng et al. 2021, "Is Attention Better Than Matrix Decomposition?") as a
    token mixer: the lower bread (a linear layer, ReLU: the tokens made non-negative), the
    ham (NMF of the (channels x tokens) matrix of each image with ``rank`` bases, ``steps``
    multiplicative updates; linear in the tokens), the upper bread (a linear layer). The
    initial bases are a fixed weight (uniform, columns L2-normalised; not trained), so
    inference and every exported file are deterministic."""

    def __init__(self, dim, num_heads=None, rank=64, steps=7, inv_t=1.0, **kwargs):
        for unused in ("qkv_bias", "attn_drop", "proj_drop"):  # the block's attention args
            kwargs.pop(unused, None)
        super().__init__(**kwargs)
        self.dim, self.rank, self.steps, self.inv_t = int(dim), int(rank), int(steps), inv_t
        self.lower = dense(self.dim, name="lower")
        self.upper = dense(self.dim, name="upper")

    def build(self, x_shape, *args):
        self.lower.build(x_shape)
        self.upper.build(x_shape)
        self.bases = self.add_weight(name="bases", shape=(self.dim, self.rank),
                                     initializer=keras.initializers.RandomUniform(0.0, 1.0),
                                     trainable=False)
        self.bases.assign(ops.convert_to_tensor(self.bases) /
                          ops.norm(self.bases, axis=0, keepdims=True))

    def call(self, x, attention_mask=None, bias=None, training=None):
        if attention_mask is not None or bias is not None:
            raise ValueError("the Hamburger mixer takes no attention mask or bias")
        h = ops.relu(self.lower(x))  # (B, N, d)
        channels_tokens = ops.transpose(h, (0, 2, 1))
        bases = ops.broadcast_to(self.bases, (ops.shape(h)[0], self.dim, self.rank))
        ham = nmf_multiplicative(channels_tokens, bases, self.steps, self.inv_t)
        return self.upper(ops.transpose(ham, (0, 2, 1)))

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "rank": self.rank,
                "steps": self.steps, "inv_t": self.inv_t}


ATTENTIONS = {"dense": MultiHeadAttention, "linear": LinearAttention, "topk": TopKAttention,
              "bigbird": BigBirdAttention, "lsra": LongShortRangeAttention,
              "hamburger": HamburgerMixer}


def attention_mixer(kind, dim, num_heads, **kwargs):
    """The token mixer ``kind`` (ATTENTIONS) with MultiHeadAttention's arguments and the
    kind's own (``k`` of top-k, ``causal`` of linear attention, BigBird's ``block_size``,
    ``window``, ``num_global``, ``num_random``, ``seed``)."""
    if kind not in ATTENTIONS:
        raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {kind!r}")
    return ATTENTIONS[kind](dim, num_heads, **kwargs)
