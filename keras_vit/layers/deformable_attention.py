"""Multi-scale deformable attention (Zhu et al. 2021, Deformable DETR's ``MSDeformAttn``).

Each query attends to ``num_points`` sampled locations per head and feature level around its
reference point: offsets and attention weights are linear functions of the query, values are
bilinearly sampled from the flattened multi-level value map. The sampling is written as flat
gathers (``ops.take`` on a (B * S * heads, head_dim) value table) with
``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` semantics: corners
outside a level's map contribute zero. No custom op, every level, head and point at once, and
no tensor above 4-D, so the layer converts to builtin-only TFLite (GATHER, FLOOR, CAST).
"""

import numpy as np
import keras
from keras import ops

from keras_vit.layers.attention import softmax_float32
from keras_vit.layers.common import Linear


def level_tables(spatial_shapes, num_heads, num_points):
    """Per sampling slot (head, level, point order, as the reference's views): the level's
    height, width and start row in the flattened (sum h*w) value sequence, and the head."""
    shapes = np.asarray(spatial_shapes, np.int64).reshape(-1, 2)
    starts = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]])
    num_levels = len(shapes)
    level = np.tile(np.repeat(np.arange(num_levels), num_points), num_heads)
    head = np.repeat(np.arange(num_heads), num_levels * num_points)
    return shapes[level, 0], shapes[level, 1], starts[level], head


def deformable_sampling(value, loc_x, loc_y, weights, spatial_shapes, num_heads, num_points):
    """sum over levels/points of weights * bilinear(value at (loc_x, loc_y)), per head.

    value: (B, S, heads * head_dim), the levels' maps flattened row-major and concatenated;
    loc_x, loc_y: (B, Q, heads * levels * points) normalised locations (0 = left/top edge,
    1 = right/bottom edge of each level's map); weights: the same shape (attention weights).
    Returns (B, Q, heads * head_dim), heads concatenated as the reference's output.
    """
    heights, widths, starts, heads = level_tables(spatial_shapes, num_heads, num_points)
    seq_len = int(np.sum(np.asarray(spatial_shapes).reshape(-1, 2).prod(-1)))
    dim = value.shape[-1]
    head_dim = dim // num_heads
    batch = ops.shape(value)[0]
    num_queries = loc_x.shape[1] if loc_x.shape[1] is not None else ops.shape(loc_x)[1]
    slots = heights.size
    dtype = value.dtype
    w_f = ops.convert_to_tensor(widths.astype(np.float32), dtype)
    h_f = ops.convert_to_tensor(heights.astype(np.float32), dtype)
    # grid_sample with align_corners=False: pixel centres at (i + 0.5) / size.
    x = loc_x * w_f - 0.5
    y = loc_y * h_f - 0.5
    x0 = ops.floor(x)
    y0 = ops.floor(y)
    fx = x - x0
    fy = y - y0
    # Row of (batch b, sequence position s, head h) in the (B * S * heads, head_dim) table.
    batch_base = ops.reshape(ops.arange(batch, dtype="int32") * (seq_len * num_heads), (-1, 1, 1))
    slot_base = ops.convert_to_tensor((starts * num_heads + heads).astype(np.int32))
    w_i = ops.convert_to_tensor(widths.astype(np.int32))
    corner_rows, corner_weights = [], []
    for dy, wy in ((0.0, 1.0 - fy), (1.0, fy)):
        for dx, wx in ((0.0, 1.0 - fx), (1.0, fx)):
            cx, cy = x0 + dx, y0 + dy
            inside = ((cx >= 0) & (cx <= w_f - 1) & (cy >= 0) & (cy <= h_f - 1))
            # Clipped before the cast so that far-away points stay valid indices (weight 0).
            xi = ops.cast(ops.clip(cx, 0, w_f - 1), "int32")
            yi = ops.cast(ops.clip(cy, 0, h_f - 1), "int32")
            corner_rows.append(batch_base + slot_base + (yi * w_i + xi) * num_heads)
            corner_weights.append(weights * wy * wx * ops.cast(inside, dtype))
    rows = ops.stack(corner_rows, axis=-1)  # (B, Q, slots, 4)
    mix = ops.stack(corner_weights, axis=-1)
    table = ops.reshape(value, (-1, head_dim))
    sampled = ops.take(table, ops.reshape(rows, (-1,)), axis=0)
    per_head = slots // num_heads * 4
    sampled = ops.reshape(sampled, (-1, per_head, head_dim))
    mix = ops.reshape(mix, (-1, 1, per_head))
    out = ops.matmul(mix, sampled)  # (B * Q * heads, 1, head_dim)
    return ops.reshape(out, (-1, num_queries, dim))


@keras.saving.register_keras_serializable(package="keras_vit")
class MultiScaleDeformableAttention(keras.layers.Layer):
    """Deformable DETR's ``MSDeformAttn``: ``call(query, reference_points, value,
    value_mask=None)``.

    query (B, Q, dim) (position embedding already added, as the reference's callers do);
    reference_points (B, Q, levels, 2) normalised (x, y), or (B, Q, levels, 4) boxes
    (cx, cy, w, h) whose points are offset by offset / points * wh / 2; value (B, S, dim), the
    ``spatial_shapes`` levels flattened and concatenated; value_mask (B, S), 1 = real pixel
    (padding values are zeroed). Sublayers carry the reference's names: ``sampling_offsets``,
    ``attention_weights``, ``value_proj``, ``output_proj``. Initialised as the reference
    (zero offsets' weights, offset biases on a ring per head, zero attention weights, Xavier
    value/output projections).
    """

    def __init__(self, dim, spatial_shapes, num_heads=8, num_points=4, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads, self.num_points = int(dim), int(num_heads), int(num_points)
        self.spatial_shapes = tuple(tuple(int(v) for v in s) for s in spatial_shapes)
        self.num_levels = len(self.spatial_shapes)
        if self.dim % self.num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        slots = self.num_heads * self.num_levels * self.num_points
        thetas = np.arange(self.num_heads, dtype=np.float32) * (2.0 * np.pi / self.num_heads)
        ring = np.stack([np.cos(thetas), np.sin(thetas)], -1)
        ring = ring / np.abs(ring).max(-1, keepdims=True)
        ring = np.tile(ring[:, None, None], (1, self.num_levels, self.num_points, 1))
        ring = ring * np.arange(1, self.num_points + 1, dtype=np.float32)[None, None, :, None]
        self.sampling_offsets = Linear(
            slots * 2, kernel_initializer="zeros",
            bias_initializer=keras.initializers.Constant(ring.reshape(-1)),
            name="sampling_offsets")
        self.attention_weights = Linear(slots, kernel_initializer="zeros",
                                        name="attention_weights")
        self.value_proj = Linear(self.dim, kernel_initializer="glorot_uniform", name="value_proj")
        self.output_proj = Linear(self.dim, kernel_initializer="glorot_uniform",
                                  name="output_proj")

    def build(self, query_shape, reference_points_shape=None, value_shape=None,
              value_mask_shape=None):
        self.sampling_offsets.build(query_shape)
        self.attention_weights.build(query_shape)
        self.value_proj.build(value_shape if value_shape is not None else query_shape)
        self.output_proj.build(tuple(query_shape[:-1]) + (self.dim,))

    def sampling_locations(self, query, reference_points):
        """(loc_x, loc_y), each (B, Q, heads * levels * points)."""
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query)  # (B, Q, heads * levels * points * 2)
        off_x, off_y = offsets[..., 0::2], offsets[..., 1::2]
        coords = reference_points.shape[-1]
        refs = ops.reshape(reference_points, (-1, ops.shape(query)[1], levels * coords))
        # Each slot's level, to spread the (levels,) reference values over heads and points.
        level = np.tile(np.repeat(np.arange(levels), points), heads)

        def ref(component):
            return ops.take(refs, level * coords + component, axis=2)

        if coords == 2:
            heights, widths = level_tables(self.spatial_shapes, heads, points)[:2]
            loc_x = ref(0) + off_x / widths.astype(np.float32)
            loc_y = ref(1) + off_y / heights.astype(np.float32)
        elif coords == 4:
            loc_x = ref(0) + off_x / points * ref(2) * 0.5
            loc_y = ref(1) + off_y / points * ref(3) * 0.5
        else:
            raise ValueError(f"reference points end in 2 or 4 coordinates, got {coords}")
        return loc_x, loc_y

    def call(self, query, reference_points, value, value_mask=None):
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if value_mask is not None:
            value = value * ops.cast(value_mask, value.dtype)[..., None]
        num_queries = ops.shape(query)[1]
        logits = ops.reshape(self.attention_weights(query), (-1, num_queries, heads, levels * points))
        weights = ops.reshape(softmax_float32(logits),
                              (-1, num_queries, heads * levels * points))
        loc_x, loc_y = self.sampling_locations(query, reference_points)
        out = deformable_sampling(value, loc_x, loc_y, weights, self.spatial_shapes, heads, points)
        return self.output_proj(out)

    def compute_output_shape(self, query_shape, *args, **kwargs):
        return tuple(query_shape[:-1]) + (self.dim,)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "spatial_shapes": self.spatial_shapes,
                "num_heads": self.num_heads, "num_points": self.num_points}
