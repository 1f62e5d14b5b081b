"""Box formats and overlaps (keras.ops): (cx, cy, w, h) <-> (x0, y0, x1, y1), IoU and
generalised IoU (Rezatofighi et al. 2019) of every pair, as DETR's ``util/box_ops.py``.

Degenerate boxes (zero width or height) give IoU 0 and a finite GIoU: unions and enclosing
areas are floored at a tiny epsilon instead of dividing by zero.
"""

from keras import ops

EPS = 1e-7


def box_cxcywh_to_xyxy(boxes):
    cx, cy, w, h = ops.unstack(boxes, 4, axis=-1)
    return ops.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes):
    x0, y0, x1, y1 = ops.unstack(boxes, 4, axis=-1)
    return ops.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes):
    """Area of xyxy boxes; inverted boxes count as empty."""
    return ops.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * ops.maximum(
        boxes[..., 3] - boxes[..., 1], 0.0)


def _intersection_and_union(a, b):
    """(…, N, M) intersections and unions of xyxy boxes a (…, N, 4) and b (…, M, 4)."""
    a_, b_ = ops.expand_dims(a, -2), ops.expand_dims(b, -3)
    top_left = ops.maximum(a_[..., :2], b_[..., :2])
    bottom_right = ops.minimum(a_[..., 2:], b_[..., 2:])
    wh = ops.maximum(bottom_right - top_left, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = ops.expand_dims(box_area(a), -1) + ops.expand_dims(box_area(b), -2) - inter
    return inter, union


def box_iou(a, b):
    """IoU of every pair of xyxy boxes: (…, N, M)."""
    inter, union = _intersection_and_union(a, b)
    return inter / ops.maximum(union, EPS)


def generalized_box_iou(a, b):
    """GIoU of every pair of xyxy boxes, in [-1, 1]: IoU - (enclosing - union) / enclosing."""
    inter, union = _intersection_and_union(a, b)
    iou = inter / ops.maximum(union, EPS)
    a_, b_ = ops.expand_dims(a, -2), ops.expand_dims(b, -3)
    top_left = ops.minimum(a_[..., :2], b_[..., :2])
    bottom_right = ops.maximum(a_[..., 2:], b_[..., 2:])
    wh = ops.maximum(bottom_right - top_left, 0.0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / ops.maximum(enclosing, EPS)
