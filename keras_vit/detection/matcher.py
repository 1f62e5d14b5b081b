"""Bipartite matching of predictions to targets (DETR's Hungarian matcher).

``match_cost`` builds DETR's matching cost between every query and every target of an
image: class cost (-p(class), or the focal-loss difference of Deformable DETR), L1 box
distance and -GIoU, weighted 1 / 5 / 2 (Deformable DETR: class weight 2). Two solvers give
the same optimal assignment:

* ``hungarian_match``: scipy's ``linear_sum_assignment`` on the host (numpy in, numpy out),
  what the official repositories do;
* ``linear_sum_assignment_in_graph``: the Hungarian algorithm with potentials (Kuhn-Munkres
  in the shortest-augmenting-path form, O(n^2 m)) written in ``keras.ops`` while-loops, so
  that it runs inside an XLA / TPU graph without host callbacks.
"""

import numpy as np
from keras import ops

from keras_vit.detection.boxes import box_cxcywh_to_xyxy, generalized_box_iou

DETR_COST_WEIGHTS = dict(class_weight=1.0, bbox_weight=5.0, giou_weight=2.0)
DEFORMABLE_COST_WEIGHTS = dict(class_weight=2.0, bbox_weight=5.0, giou_weight=2.0)


def match_cost(logits, pred_boxes, target_classes, target_boxes, class_weight=1.0,
               bbox_weight=5.0, giou_weight=2.0, focal=False, alpha=0.25, gamma=2.0):
    """(Q, N) matching cost of one image: logits (Q, K'), pred_boxes (Q, 4) cxcywh,
    target_classes (N,) int, target_boxes (N, 4) cxcywh (all normalised)."""
    target_classes = ops.cast(target_classes, "int32")
    if focal:  # Deformable DETR: sigmoid probabilities, focal-loss cost difference
        prob = ops.sigmoid(logits)
        neg = (1 - alpha) * prob ** gamma * -ops.log(1 - prob + 1e-8)
        pos = alpha * (1 - prob) ** gamma * -ops.log(prob + 1e-8)
        class_cost = ops.take(pos - neg, target_classes, axis=1)
    else:
        class_cost = -ops.take(ops.softmax(logits, axis=-1), target_classes, axis=1)
    l1 = ops.sum(ops.abs(ops.expand_dims(pred_boxes, 1) - ops.expand_dims(target_boxes, 0)),
                 axis=-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes))
    return bbox_weight * l1 + class_weight * class_cost - giou_weight * giou


def hungarian_match(cost):
    """scipy's optimal assignment of a (Q, N) cost (N <= Q): (query indices, target
    indices), sorted by query as the official matcher returns them."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.asarray(cost, np.float64))
    return rows.astype(np.int64), cols.astype(np.int64)


def linear_sum_assignment_in_graph(cost, num_targets=None):
    """The query assigned to each target: cost (Q, N_max) -> (N_max,) int32, -1 for the
    padded targets at and after ``num_targets`` (a scalar tensor; default N_max). Needs
    num_targets <= Q. The assignment minimises the total cost, as scipy's does (identical
    where the optimum is unique).
    """
    cost = ops.transpose(ops.convert_to_tensor(cost, "float32"))  # rows: targets
    n_max, m = cost.shape
    n = n_max if num_targets is None else ops.cast(num_targets, "int32")
    # 1-indexed as the textbook algorithm: row 0 / column 0 are the virtual start.
    a = ops.pad(cost, [[1, 0], [1, 0]])
    inf = ops.convert_to_tensor(np.float32(np.inf))
    columns = ops.arange(m + 1, dtype="int32")
    rows_one_hot = ops.eye(n_max + 1, dtype="float32")

    def add_row(i, state):
        u, v, p, way = state
        p = ops.where(columns == 0, i, p)

        def searching(j0, minv, used, u, v, way):
            return ops.take(p, j0) != 0

        def relax(j0, minv, used, u, v, way):
            used = ops.logical_or(used, columns == j0)
            i0 = ops.take(p, j0)
            cur = ops.take(a, i0, axis=0) - ops.take(u, i0) - v
            free = ops.logical_not(used)
            better = ops.logical_and(free, cur < minv)
            minv = ops.where(better, cur, minv)
            way = ops.where(better, j0, way)
            candidates = ops.where(free, minv, inf)
            j1 = ops.cast(ops.argmin(candidates), "int32")
            delta = ops.take(candidates, j1)
            # u[p[j]] += delta for every used column j (their rows are distinct).
            used_rows = ops.sum(ops.take(rows_one_hot, p, axis=0)
                                * ops.expand_dims(ops.cast(used, "float32"), 1), axis=0)
            u = u + delta * used_rows
            v = ops.where(used, v - delta, v)
            minv = ops.where(free, minv - delta, minv)
            return j1, minv, used, u, v, way

        start = (ops.convert_to_tensor(0, "int32"), ops.full((m + 1,), inf),
                 ops.zeros((m + 1,), "bool"), u, v, way)
        j0, _, _, u, v, way = ops.while_loop(searching, relax, start)

        def augmenting(j0, p):
            return j0 != 0

        def flip(j0, p):
            j1 = ops.take(way, j0)
            return j1, ops.where(columns == j0, ops.take(p, j1), p)

        _, p = ops.while_loop(augmenting, flip, (j0, p))
        return u, v, p, way

    def more_rows(i, u, v, p, way):
        return i <= n

    def next_row(i, u, v, p, way):
        return (i + 1,) + tuple(add_row(i, (u, v, p, way)))

    state = (ops.convert_to_tensor(1, "int32"), ops.zeros((n_max + 1,), "float32"),
             ops.zeros((m + 1,), "float32"), ops.zeros((m + 1,), "int32"),
             ops.zeros((m + 1,), "int32"))
    _, _, _, p, _ = ops.while_loop(more_rows, next_row, state)
    # p[j] is the (1-indexed) target of query j - 1; invert it per target.
    assigned = ops.one_hot(p[1:] - 1, n_max)  # (Q, N_max); p = 0 (no target) -> zeros
    has_query = ops.sum(assigned, axis=0) > 0
    return ops.where(has_query, ops.cast(ops.argmax(assigned, axis=0), "int32"), -1)
