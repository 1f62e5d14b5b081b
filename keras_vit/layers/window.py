"""Window attention (Liu et al. 2021, Swin): local self-attention inside non-overlapping windows,
relative position bias, and the shifted-window scheme with its attention mask.

Everything here stays TFLite builtin-only and at most 4-D on the hot path:
windows are cut with reshape / transpose of 4-D tensors (the window width is
merged with the channels), the cyclic shift is slice + concatenate (no
``ops.roll``, which becomes FlexRoll), the relative position bias is a flat
``ops.take`` over a numpy index, and the shifted-window mask is a numpy
constant built from the configuration. Swin, Swin-UNet and other windowed
families share these.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_vit.layers.attention import MultiHeadAttention, merge_heads, softmax_float32
from keras_vit.layers.blocks import ResidualBlock
from keras_vit.layers.embedding import to_2tuple
from keras_vit.layers.mlp import Mlp

# timm's (and the original Swin's) additive mask value between tokens of different regions.
MASK_VALUE = -100.0


def window_partition(x, window_size):
    """(B, H, W, C) -> (B * nH * nW, wh * ww, C), windows in row-major order per image.

    H and W must be multiples of the window. The window width is merged with
    the channels so every intermediate is 4-D.
    """
    wh, ww = to_2tuple(window_size)
    _, h, w, c = x.shape
    x = ops.reshape(x, (-1, wh, w // ww, ww * c))       # (B*nH, wh, nW, ww*C)
    x = ops.transpose(x, (0, 2, 1, 3))                   # (B*nH, nW, wh, ww*C)
    return ops.reshape(x, (-1, wh * ww, c))


def window_reverse(windows, window_size, height, width):
    """(B * nH * nW, wh * ww, C) -> (B, H, W, C), the inverse of ``window_partition``."""
    wh, ww = to_2tuple(window_size)
    c = windows.shape[-1]
    x = ops.reshape(windows, (-1, width // ww, wh, ww * c))  # (B*nH, nW, wh, ww*C)
    x = ops.transpose(x, (0, 2, 1, 3))                        # (B*nH, wh, nW, ww*C)
    return ops.reshape(x, (-1, height, width, c))


def cyclic_shift(x, shift, axes=(1, 2)):
    """``torch.roll(x, shifts=shift, dims=axes)`` as split + concatenate (exact, builtin TFLite).

    A negative shift moves content towards the start (Swin's forward shift),
    a positive one back.
    """
    for s, axis in zip(to_2tuple(shift), axes):
        size = x.shape[axis]
        s = s % size if size else 0
        if s == 0:
            continue
        # A split, not two slices: its gradient is one concat, a slice's a zero-filled
        # full-size tensor each (Swin-T's float32 train step, benchmarks/README.md).
        tail, head = ops.split(x, [size - s], axis=axis)
        x = ops.concatenate([head, tail], axis=axis)
    return x


def relative_position_index(window_size):
    """(wh*ww, wh*ww) int32 index into a ((2wh-1)(2ww-1), heads) table, as timm's
    ``get_relative_position_index``."""
    wh, ww = to_2tuple(window_size)
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1).astype(np.int32)


def relative_position_bias(table, window_size):
    """A (T, heads) bias table -> the (1, heads, N, N) additive attention bias of one window."""
    n = int(np.prod(to_2tuple(window_size)))
    heads = table.shape[-1]
    # Flat gather over the transposed table: index h * T + idx, so the result is heads-first.
    num_pos = table.shape[0]
    index = relative_position_index(window_size).reshape(-1)
    flat = (np.arange(heads)[:, None] * num_pos + index[None, :]).reshape(-1).astype(np.int32)
    bias = ops.take(ops.reshape(ops.transpose(table), (-1,)), flat, axis=0)
    return ops.reshape(bias, (1, heads, n, n))


def shifted_window_mask(resolution, window_size, shift_size):
    """The (nW, N, N) float32 SW-MSA mask (0 within a region, -100 across), or None without shift.

    ``resolution`` is the padded (Hp, Wp), multiples of the window. Regions are
    labelled exactly as timm's ``SwinTransformerBlock.get_attn_mask``
    (including its slicing when one axis has no shift).
    """
    wh, ww = to_2tuple(window_size)
    sh, sw = to_2tuple(shift_size)
    if not (sh or sw):
        return None
    hp, wp = resolution
    img = np.zeros((1, hp, wp, 1), np.float32)
    cnt = 0
    for h in ((0, -wh), (-wh, -sh), (-sh, None)):
        for w in ((0, -ww), (-ww, -sw), (-sw, None)):
            img[:, h[0]:h[1], w[0]:w[1], :] = cnt
            cnt += 1
    win = img.reshape(hp // wh, wh, wp // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, MASK_VALUE, 0.0).astype(np.float32)


def padded_size(size, window):
    return int(math.ceil(size / window) * window)


@keras.saving.register_keras_serializable(package="keras_vit")
class WindowAttention(MultiHeadAttention):
    """Window multi-head self-attention (W-MSA / SW-MSA) with relative position bias (timm's
    ``WindowAttention``).

    Input: windows (B * nW, wh*ww, C). The learned ``relative_position_bias_table``
    ((2wh-1)(2ww-1), heads) is gathered into a per-head bias; an optional
    additive ``attn_mask`` (nW, N, N) separates the regions of shifted windows
    (windows of one image are consecutive in the batch axis).
    """

    def __init__(self, dim, num_heads, window_size=7, qkv_bias=True, attn_drop=0.0,
                 proj_drop=0.0, head_dim=None, **kwargs):
        for key in ("cross",):
            kwargs.pop(key, None)
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, head_dim=head_dim, **kwargs)
        self.window_size = to_2tuple(window_size)

    @property
    def num_relative_positions(self):
        wh, ww = self.window_size
        return (2 * wh - 1) * (2 * ww - 1)

    def build(self, x_shape, context_shape=None):
        super().build(x_shape)
        self.relative_position_bias_table = self.add_weight(
            name="relative_position_bias_table",
            shape=(self.num_relative_positions, self.num_heads),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02))

    def call(self, x, attn_mask=None, training=None):
        q, k, v = self.project_qkv(x)
        n = x.shape[1]
        logits = ops.matmul(q * ops.cast(self.scale, q.dtype), ops.transpose(k, (0, 1, 3, 2)))
        bias = relative_position_bias(self.relative_position_bias_table, self.window_size)
        logits = logits + ops.cast(bias, logits.dtype)
        if attn_mask is not None:
            # (B*nW, heads, N, N) -> (B, nW, heads, N*N) + (1, nW, 1, N*N): 4-D broadcast.
            nw = attn_mask.shape[0]
            logits = ops.reshape(logits, (-1, nw, self.num_heads, n * n))
            logits = logits + ops.cast(ops.reshape(attn_mask, (1, nw, 1, n * n)), logits.dtype)
            logits = ops.reshape(logits, (-1, self.num_heads, n, n))
        attn = softmax_float32(logits)
        attn = self.attn_dropout(attn, training=training)
        out = merge_heads(ops.matmul(attn, v))
        return self.proj_dropout(self.proj(out), training=training)

    def get_config(self):
        config = super().get_config()
        config.pop("cross", None)
        return {**config, "window_size": self.window_size}


@keras.saving.register_keras_serializable(package="keras_vit")
class SwinTransformerBlock(ResidualBlock):
    """Swin block on a (B, H, W, C) map: the pre-norm skeleton x + W-MSA(LN(x)), then
    x + MLP(LN(x)) (timm's ``SwinTransformerBlock``; sublayers norm1, attn, norm2, mlp),
    whose mixer is window attention on the shifted, windowed map (``mix``).

    ``window_size`` and ``shift_size`` are the final ones: the caller clips the
    window to the resolution as timm does (``swin_window_and_shift``). As timm
    1.0.31: the map is cyclically shifted by ``-shift_size``, then zero-padded
    at the bottom / right to a multiple of the window, split into windows,
    attended (with the shifted-window mask built for the padded size), merged,
    cropped and shifted back.
    """

    def __init__(self, dim, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0, qkv_bias=True,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, norm_eps=1e-5, head_dim=None,
                 act="gelu", **kwargs):
        window_size = to_2tuple(window_size)
        super().__init__(
            WindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
                            proj_drop=drop, head_dim=head_dim, name="attn"),
            Mlp(int(dim * mlp_ratio), act=act, drop=drop, name="mlp"),
            norm_eps=norm_eps, drop_path=drop_path, **kwargs)
        self.dim, self.num_heads = int(dim), int(num_heads)
        self.window_size, self.shift_size = window_size, to_2tuple(shift_size)
        self.mlp_ratio, self.qkv_bias = float(mlp_ratio), bool(qkv_bias)
        self.drop, self.attn_drop = float(drop), float(attn_drop)
        self.head_dim, self.act = head_dim, act

    def attention_mask(self, height, width):
        """The numpy SW-MSA mask for an (H, W) map, or None (no shift)."""
        (wh, ww) = self.window_size
        return shifted_window_mask((padded_size(height, wh), padded_size(width, ww)),
                                   self.window_size, self.shift_size)

    def mix(self, x, training=None):
        _, h, w, _ = x.shape
        if h is None or w is None:
            raise ValueError("SwinTransformerBlock needs a static spatial size")
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        x = cyclic_shift(x, (-sh, -sw))
        hp, wp = padded_size(h, wh), padded_size(w, ww)
        if (hp, wp) != (h, w):
            x = ops.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
        windows = window_partition(x, self.window_size)
        windows = self.attn(windows, attn_mask=self.attention_mask(h, w), training=training)
        x = window_reverse(windows, self.window_size, hp, wp)
        if (hp, wp) != (h, w):
            x = x[:, :h, :w, :]
        return cyclic_shift(x, (sh, sw))

    def get_config(self):
        return {**self.block_config(), "dim": self.dim, "num_heads": self.num_heads,
                "window_size": self.window_size, "shift_size": self.shift_size,
                "mlp_ratio": self.mlp_ratio, "qkv_bias": self.qkv_bias, "drop": self.drop,
                "attn_drop": self.attn_drop, "head_dim": self.head_dim, "act": self.act}


def swin_window_and_shift(resolution, window_size, shifted, always_partition=False):
    """timm's ``_calc_window_shift``: per axis, a window not smaller than the resolution is
    clipped to it and that axis is not shifted; otherwise the shift is window // 2."""
    window_size = to_2tuple(window_size)
    shift = tuple(w // 2 for w in window_size) if shifted else (0, 0)
    if always_partition:
        return window_size, shift
    window = tuple(r if r <= w else w for r, w in zip(resolution, window_size))
    shift = tuple(0 if r <= w else s for r, w, s in zip(resolution, window, shift))
    return window, shift
