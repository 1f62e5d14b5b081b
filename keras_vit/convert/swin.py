"""Swin: relative position bias tables resized for another window, original checkpoint layout.

Swin layers are named as timm's modules, so ``load_timm_weights`` maps them by
name. Two things need more, both as timm's ``checkpoint_filter_fn``:
- a ``relative_position_bias_table`` made for another window (a 384 px
  window-12 checkpoint in a window-7 model, or a stage whose window is clipped
  to a small resolution) is resized with timm's ``resize_rel_pos_bias_table``
  (geometric-progression positions, piecewise-linear interpolation);
- checkpoints in the original Microsoft layout (patch merging at the end of a
  stage, a plain ``head``) are renamed by ``original_to_timm``.
"""

import re

import numpy as np

from keras_vit.convert.core import register_layer_converter
from keras_vit.layers.window import WindowAttention


def _progression_positions(src, dst):
    """timm's ``_calc``: source sample positions spaced by a geometric progression so that the
    source's outermost sample lands near the destination's edge."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = (1.0 - q ** (src // 2)) / (1.0 - q)
        if gp > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(dis)] + [0] + dis, np.float64)


def _interp_linear_1d_weights(points, targets):
    """Left/right indices and distances of timm's RegularGridInterpolator along one axis."""
    right = np.searchsorted(points, targets, side="left")  # torch.bucketize(right=False)
    right = np.minimum(right, len(points) - 1)
    left = np.clip(right - 1, 0, len(points) - 1)
    d_left = np.maximum(targets - points[left], 0.0)
    d_right = np.maximum(points[right] - targets, 0.0)
    both = (d_left == 0) & (d_right == 0)
    d_left = np.where(both, 1.0, d_left)
    d_right = np.where(both, 1.0, d_right)
    return left, right, d_left, d_right


def resize_relative_position_bias_table(table, new_window_size, old_window_size=None):
    """(T_old, heads) -> ((2wh-1)(2ww-1), heads), as timm's ``resize_rel_pos_bias_table``.

    Without ``old_window_size`` the source window is assumed square (as timm's
    checkpoint loading does) unless the table size rules that out, in which
    case it must already fit the new window.
    """
    table = np.asarray(table)
    wh, ww = (new_window_size, new_window_size) if np.isscalar(new_window_size) \
        else tuple(new_window_size)
    dst = (2 * wh - 1, 2 * ww - 1)
    src_num, heads = table.shape
    if old_window_size is not None:
        oh, ow = (old_window_size,) * 2 if np.isscalar(old_window_size) else old_window_size
        src = (2 * oh - 1, 2 * ow - 1)
    else:
        side = int(src_num ** 0.5)
        if side * side == src_num:
            src = (side, side)
        elif src_num == dst[0] * dst[1]:
            src = dst
        else:
            raise ValueError(f"cannot infer the window of a relative position table of "
                             f"{src_num} entries; pass old_window_size")
    if src == dst:
        return table
    ys = _progression_positions(src[0], dst[0])
    xs = _progression_positions(src[1], dst[1])
    ty, tx = dst[0] // 2, dst[1] // 2
    dy = np.arange(-ty, ty + 0.1, 1.0)
    dx = np.arange(-tx, tx + 0.1, 1.0)
    yl, yr, ydl, ydr = _interp_linear_1d_weights(ys, dy)
    xl, xr, xdl, xdr = _interp_linear_1d_weights(xs, dx)
    z = table.astype(np.float64).reshape(src[0], src[1], heads)
    out = (z[yl][:, xl] * (ydr[:, None] * xdr[None, :])[..., None]
           + z[yl][:, xr] * (ydr[:, None] * xdl[None, :])[..., None]
           + z[yr][:, xl] * (ydl[:, None] * xdr[None, :])[..., None]
           + z[yr][:, xr] * (ydl[:, None] * xdl[None, :])[..., None])
    out = out / ((ydl + ydr)[:, None] * (xdl + xdr)[None, :])[..., None]
    return out.reshape(-1, heads).astype(table.dtype)


@register_layer_converter(WindowAttention)
def _window_attention(layer, path, options):
    shape = (layer.num_relative_positions, layer.num_heads)
    wh, ww = layer.window_size

    def convert(a):
        # timm's checkpoint_filter_fn resizes on a shape change, and for non-square windows.
        if a.ndim == 2 and (tuple(a.shape) != shape or wh != ww):
            return resize_relative_position_bias_table(a, layer.window_size)
        return a

    # Only the table: qkv and proj are Dense sublayers the core maps by name.
    return [(layer.relative_position_bias_table, f"{path}.relative_position_bias_table", convert)]


def original_to_timm(state_dict):
    """A Swin checkpoint in the original Microsoft layout -> timm's layout (timm's
    ``checkpoint_filter_fn``): ``layers.i.downsample`` -> ``layers.{i+1}.downsample``,
    ``head.`` -> ``head.fc.``; buffers (relative_position_index, attn_mask) dropped.
    A timm-layout dict is returned with only its buffers dropped."""
    state_dict = dict(state_dict)
    for nest in ("model", "state_dict"):
        if nest in state_dict and isinstance(state_dict[nest], dict):
            state_dict = dict(state_dict[nest])
    old = "layers.0.downsample.reduction.weight" in state_dict
    out = {}
    for k, v in state_dict.items():
        if "relative_position_index" in k or "attn_mask" in k:
            continue
        if old:
            k = re.sub(r"layers\.(\d+)\.downsample",
                       lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            k = k.replace("head.", "head.fc.")
        out[k] = v
    return out
