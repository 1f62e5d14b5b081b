"""Patch embedding, prefix tokens ([CLS], distillation, [DET]) and position embeddings."""

import math

import keras
import numpy as np
from keras import ops

from keras_vit.layers.common import layer_norm, trunc_normal


def to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (int(x), int(x))


@keras.saving.register_keras_serializable(package="keras_vit")
class PatchEmbed(keras.layers.Layer):
    """Image (B, H, W, C) to tokens (B, N, D) by a strided convolution (timm ``PatchEmbed``).

    By default kernel = stride = patch size, the non-overlapping ViT split.
    ``stride`` and ``padding`` give overlapping embeddings (PVT v2, SegFormer):
    padding is explicit and symmetric, as torch's Conv2d, so outputs match.
    ``flatten=False`` keeps the (B, H', W', D) map.
    """

    def __init__(self, patch_size=16, embed_dim=768, stride=None, padding=0, norm=False,
                 flatten=True, bias=True, norm_eps=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride) if stride is not None else self.patch_size
        self.padding = to_2tuple(padding)
        self.embed_dim, self.norm, self.flatten = int(embed_dim), bool(norm), bool(flatten)
        self.bias, self.norm_eps = bool(bias), float(norm_eps)
        self.proj = keras.layers.Conv2D(self.embed_dim, self.patch_size, strides=self.stride,
                                        padding="valid", use_bias=bias, name="proj")
        self.norm_layer = layer_norm(norm_eps, name="norm") if norm else None

    def grid_size(self, height, width):
        (kh, kw), (sh, sw), (ph, pw) = self.patch_size, self.stride, self.padding
        return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1

    def build(self, input_shape):
        h, w = input_shape[1], input_shape[2]
        ph, pw = self.padding
        self.proj.build((input_shape[0], h + 2 * ph if h else None, w + 2 * pw if w else None,
                         input_shape[3]))
        if self.norm_layer is not None:
            self.norm_layer.build((None, None, self.embed_dim))

    def call(self, x):
        if any(self.padding):
            ph, pw = self.padding
            x = ops.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
        x = self.proj(x)
        if self.flatten:
            x = ops.reshape(x, (-1, x.shape[1] * x.shape[2], self.embed_dim))
        if self.norm_layer is not None:
            x = self.norm_layer(x)
        return x

    def compute_output_shape(self, input_shape):
        gh, gw = self.grid_size(input_shape[1], input_shape[2])
        if self.flatten:
            return (input_shape[0], gh * gw, self.embed_dim)
        return (input_shape[0], gh, gw, self.embed_dim)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size, "embed_dim": self.embed_dim,
                "stride": self.stride, "padding": self.padding, "norm": self.norm,
                "flatten": self.flatten, "bias": self.bias, "norm_eps": self.norm_eps}


@keras.saving.register_keras_serializable(package="keras_vit")
class PrefixTokens(keras.layers.Layer):
    """Prepends learnable tokens to a sequence: [CLS], DeiT's distillation token, YOLOS's [DET] tokens.

    ``token_names`` gives one weight per name, each (1, count, D); they are
    concatenated in order in front of the input.
    """

    def __init__(self, token_names=("cls_token",), counts=None, stddev=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.token_names = tuple(token_names)
        self.counts = tuple(counts) if counts is not None else (1,) * len(self.token_names)
        if len(self.counts) != len(self.token_names):
            raise ValueError("counts must give one count per token name")
        self.stddev = float(stddev)

    @property
    def num_tokens(self):
        return sum(self.counts)

    def build(self, input_shape):
        init = keras.initializers.TruncatedNormal(stddev=self.stddev) if self.stddev else "zeros"
        self.tokens = [self.add_weight(name=n, shape=(1, c, input_shape[-1]), initializer=init)
                       for n, c in zip(self.token_names, self.counts)]

    def call(self, x):
        batch = ops.shape(x)[0]
        prefix = [ops.broadcast_to(ops.cast(t, x.dtype), (batch,) + tuple(t.shape[1:]))
                  for t in self.tokens]
        return ops.concatenate(prefix + [x], axis=1)

    def compute_output_shape(self, input_shape):
        n = input_shape[1] + self.num_tokens if input_shape[1] is not None else None
        return (input_shape[0], n, input_shape[2])

    def get_config(self):
        return {**super().get_config(), "token_names": self.token_names, "counts": self.counts,
                "stddev": self.stddev}


@keras.saving.register_keras_serializable(package="keras_vit")
class PositionEmbedding(keras.layers.Layer):
    """Learned absolute position embedding added to (prefix + grid) tokens, timm's ``pos_embed``.

    The weight is (1, num_prefix_tokens + gh * gw, D). Loading a checkpoint
    made for another grid resamples the grid part (``resample_position_embedding``).
    """

    def __init__(self, grid_size, num_prefix_tokens=1, stddev=0.02, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = to_2tuple(grid_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.stddev = float(stddev)

    def embedding_shape(self, input_shape):
        """The weight's shape for inputs of ``input_shape``; a ValueError if they do not fit."""
        n = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        if input_shape[1] is not None and input_shape[1] != n:
            raise ValueError(f"{type(self).__name__} for grid {self.grid_size} with "
                             f"{self.num_prefix_tokens} prefix tokens expects {n} tokens, "
                             f"got {input_shape[1]}")
        return (1, n, input_shape[-1])

    def build(self, input_shape):
        self.pos_embed = self.add_weight(name="pos_embed", shape=self.embedding_shape(input_shape),
                                         initializer=trunc_normal(self.stddev))

    def call(self, x):
        return x + ops.cast(self.pos_embed, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "grid_size": self.grid_size,
                "num_prefix_tokens": self.num_prefix_tokens, "stddev": self.stddev}


@keras.saving.register_keras_serializable(package="keras_vit")
class MapPositionEmbedding(PositionEmbedding):
    """A learned position embedding added to a (B, H, W, C) map; its weight is (1, H, W, C).

    timm keeps such embeddings as NCHW parameters named by the module path
    (PiT's ``pos_embed``, TNT's ``pixel_pos``); ``keras_vit/convert/core.py``
    transposes them and resizes the grid when it differs.
    """

    def __init__(self, grid_size, stddev=0.02, **kwargs):
        super().__init__(grid_size, num_prefix_tokens=0, stddev=stddev, **kwargs)

    def embedding_shape(self, input_shape):
        if tuple(input_shape[1:3]) != self.grid_size:
            raise ValueError(f"{self.name}: expects a {self.grid_size} map, got {input_shape}")
        return (1,) + self.grid_size + (input_shape[-1],)

    def get_config(self):
        config = super().get_config()
        del config["num_prefix_tokens"]  # a map has none
        return config


def sinusoid_table(num_positions, dim):
    """The survey's PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...), (N, d)."""
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    i = np.arange(dim)[None, :]
    angle = pos / np.power(10000.0, 2 * (i // 2) / dim)
    table = np.where(i % 2 == 0, np.sin(angle), np.cos(angle))
    return table.astype(np.float32)


def sinusoid_table_2d(grid_size, dim):
    """2-D sin-cos embedding: the first half of the channels encodes the row, the second the column."""
    if dim % 2:
        raise ValueError(f"2-D sinusoidal embedding needs an even dim, got {dim}")
    gh, gw = grid_size
    rows = np.repeat(sinusoid_table(gh, dim // 2), gw, axis=0)
    cols = np.tile(sinusoid_table(gw, dim // 2), (gh, 1))
    return np.concatenate([rows, cols], axis=1)


@keras.saving.register_keras_serializable(package="keras_vit")
class SinusoidalPositionEmbedding(keras.layers.Layer):
    """Fixed sinusoidal position encoding added to the input; no weights.

    ``grid_size=None``: 1-D over the whole sequence (prefix tokens included,
    as T2T-ViT and the original transformer do). With ``grid_size`` (gh, gw):
    2-D over the grid, the ``num_prefix_tokens`` leading tokens get zeros.
    """

    def __init__(self, grid_size=None, num_prefix_tokens=0, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = to_2tuple(grid_size) if grid_size is not None else None
        self.num_prefix_tokens = int(num_prefix_tokens)

    def table(self, length, dim):
        if self.grid_size is None:
            return sinusoid_table(length, dim)
        grid = sinusoid_table_2d(self.grid_size, dim)
        return np.concatenate([np.zeros((self.num_prefix_tokens, dim), np.float32), grid])

    def call(self, x):
        length = x.shape[1]
        if length is None:  # variable-length sequences (decoders): build the table in-graph
            if self.grid_size is not None:
                raise ValueError("a 2-D sinusoidal embedding needs a static sequence length")
            return x + self._dynamic_table(ops.shape(x)[1], x.shape[-1], x.dtype)
        return x + ops.cast(self.table(length, x.shape[-1])[None], x.dtype)

    @staticmethod
    def _dynamic_table(length, dim, dtype):
        pos = ops.cast(ops.arange(length), "float32")[:, None]
        i = np.arange(dim)
        inv_freq = ops.convert_to_tensor(
            (1.0 / np.power(10000.0, 2 * (i // 2) / dim)).astype(np.float32))
        angle = pos * inv_freq[None, :]
        even = ops.convert_to_tensor((i % 2 == 0)[None, :])
        return ops.cast(ops.where(even, ops.sin(angle), ops.cos(angle))[None], dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "grid_size": self.grid_size,
                "num_prefix_tokens": self.num_prefix_tokens}


def _cubic(x, a):
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _resize_matrix(in_size, out_size, method, antialias):
    """The (out, in) matrix torch's F.interpolate(align_corners=False) applies along one axis."""
    scale = in_size / out_size
    mat = np.zeros((out_size, in_size))
    if antialias and method in ("bilinear", "bicubic"):
        # torch's _upsample_*_aa follow PIL: kernel stretched by the downscale
        # factor, a = -0.5 for cubic, weights renormalised at the borders.
        support = (2.0 if method == "bicubic" else 1.0) * max(scale, 1.0)
        inv = 1.0 / max(scale, 1.0)
        for i in range(out_size):
            center = (i + 0.5) * scale
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            x = (np.arange(lo, hi) - center + 0.5) * inv
            w = _cubic(x, -0.5) if method == "bicubic" else np.maximum(0.0, 1.0 - np.abs(x))
            mat[i, lo:hi] = w / w.sum()
        return mat
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        if method == "bilinear":
            src = max(src, 0.0)
            x0 = int(math.floor(src))
            t = src - x0
            mat[i, min(x0, in_size - 1)] += 1 - t
            mat[i, min(x0 + 1, in_size - 1)] += t
        elif method == "bicubic":
            x0 = int(math.floor(src))
            t = src - x0
            for k, w in zip(range(-1, 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
                mat[i, min(max(x0 + k, 0), in_size - 1)] += w
        elif method == "nearest":
            mat[i, min(int(math.floor(i * scale)), in_size - 1)] = 1.0
        else:
            raise ValueError(f"unknown interpolation {method!r}; expected bicubic, bilinear or nearest")
    return mat


def resize_grid(grid, out_size, method="bicubic", antialias=True):
    """Resizes a (gh, gw, C) array as torch's F.interpolate does (align_corners=False)."""
    gh, gw, _ = grid.shape
    mh = _resize_matrix(gh, out_size[0], method, antialias)
    mw = _resize_matrix(gw, out_size[1], method, antialias)
    out = np.einsum("ih,hwc->iwc", mh, grid.astype(np.float64))
    return np.einsum("jw,iwc->ijc", mw, out)


def resample_position_embedding(pos_embed, new_grid, num_prefix_tokens=1, old_grid=None,
                                method="bicubic", antialias=True):
    """(1, prefix + old_gh*old_gw, D) -> (1, prefix + new_gh*new_gw, D), as timm's resample_abs_pos_embed.

    The prefix tokens are kept; the grid part is resized (bicubic with
    antialias by default, timm's checkpoint filter setting).
    """
    pos_embed = np.asarray(pos_embed)
    new_grid = to_2tuple(new_grid)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    if old_grid is None:
        side = int(math.isqrt(grid.shape[0]))
        if side * side != grid.shape[0]:
            raise ValueError(f"cannot infer the grid of a {grid.shape[0]}-token position embedding; "
                             "pass old_grid")
        old_grid = (side, side)
    old_grid = to_2tuple(old_grid)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    grid = grid.reshape(old_grid[0], old_grid[1], -1)
    resized = resize_grid(grid, new_grid, method, antialias).reshape(1, -1, grid.shape[-1])
    return np.concatenate([prefix, resized.astype(pos_embed.dtype)], axis=1)
