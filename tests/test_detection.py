"""What every set-prediction detector shares: box utilities, the Hungarian matchers and the
set criterion, against hand-computed values, scipy, brute force and a direct numpy
implementation of DETR's loss."""

import itertools

import keras
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from keras_vit.detection import (
    SetCriterion,
    SetPredictionModel,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    linear_sum_assignment_in_graph,
    match_cost,
)


def np_(x):
    return keras.ops.convert_to_numpy(x)


# --- boxes ------------------------------------------------------------------------------

def test_box_formats_round_trip_by_hand():
    cxcywh = np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.0, 0.2]], np.float32)
    xyxy = np_(box_cxcywh_to_xyxy(cxcywh))
    np.testing.assert_allclose(xyxy, [[0.4, 0.3, 0.6, 0.7], [0.1, 0.8, 0.1, 1.0]], atol=1e-7)
    np.testing.assert_allclose(np_(box_xyxy_to_cxcywh(xyxy)), cxcywh, atol=1e-7)


def test_iou_and_giou_by_hand():
    a = np.array([[0, 0, 2, 2]], np.float32)
    b = np.array([[1, 1, 3, 3],     # overlap 1, union 7, enclosing 9
                  [3, 0, 4, 1],     # disjoint: union 5, enclosing 4 x 2 = 8
                  [0, 0, 2, 2],     # identical
                  [1, 1, 1, 1]], np.float32)  # zero area, inside a
    np.testing.assert_allclose(np_(box_iou(a, b))[0], [1 / 7, 0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(np_(generalized_box_iou(a, b))[0],
                               [1 / 7 - (9 - 7) / 9, 0 - (8 - 5) / 8, 1, 0], atol=1e-6)
    degenerate = np.array([[1, 1, 1, 1]], np.float32)
    assert np.isfinite(np_(generalized_box_iou(degenerate, degenerate))).all()


# --- matchers ---------------------------------------------------------------------------

def _scipy_targets_to_queries(cost, count):
    expected = np.full(cost.shape[1], -1)
    queries, targets = linear_sum_assignment(cost[:, :count])
    expected[targets] = queries
    return expected


def test_in_graph_matcher_equals_scipy_on_random_costs():
    import tensorflow as tf

    compiled = tf.function(linear_sum_assignment_in_graph, jit_compile=True)
    rng = np.random.default_rng(0)
    for trial in range(30):  # eagerly every trial; under XLA (a compile per shape) 8 of them
        queries, targets = int(rng.integers(1, 40)), int(rng.integers(1, 12))
        targets = min(targets, queries)
        count = int(rng.integers(0, targets + 1))
        cost = (rng.standard_normal((queries, targets)) * rng.uniform(0.1, 10)).astype(
            np.float32)
        expected = _scipy_targets_to_queries(cost, count)
        np.testing.assert_array_equal(np_(linear_sum_assignment_in_graph(cost, count)),
                                      expected)
        if trial < 8:
            np.testing.assert_array_equal(compiled(cost, tf.constant(count)).numpy(), expected)


def test_in_graph_matcher_is_optimal_against_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        cost = rng.integers(0, 5, (5, 3)).astype(np.float32)  # integer costs: ties too
        got = np_(linear_sum_assignment_in_graph(cost))
        assert len(set(got.tolist())) == 3 and (got >= 0).all()
        best = min(sum(cost[q, t] for t, q in enumerate(p))
                   for p in itertools.permutations(range(5), 3))
        assert sum(cost[q, t] for t, q in enumerate(got)) == best


# --- the set criterion ------------------------------------------------------------------

def _numpy_detr_loss(logits, pred_boxes, classes, boxes, eos_coef=0.1, focal=False):
    """DETR's SetCriterion written out with numpy and scipy (weights 1/5/2; focal: 2/5/2)."""
    def xyxy(b):
        return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)

    def giou(a, b):
        a, b = xyxy(a), xyxy(b)
        lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), -1)
        area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), -1)  # noqa: E731
        union = area(a)[:, None] + area(b)[None] - inter
        lt, rb = np.minimum(a[:, None, :2], b[None, :, :2]), np.maximum(a[:, None, 2:], b[None, :, 2:])
        enclosing = np.prod(np.clip(rb - lt, 0, None), -1)
        return inter / union - (enclosing - union) / enclosing

    num_boxes = max((classes >= 0).sum(), 1)
    ce_num = ce_den = l1 = giou_loss = focal_sum = 0.0
    for b in range(len(logits)):
        n = int((classes[b] >= 0).sum())
        tc, tb = classes[b, :n], boxes[b, :n]
        if focal:
            prob = 1 / (1 + np.exp(-logits[b]))
            neg = 0.75 * prob ** 2 * -np.log(1 - prob + 1e-8)
            pos = 0.25 * (1 - prob) ** 2 * -np.log(prob + 1e-8)
            class_cost = (pos - neg)[:, tc] * 2
        else:
            p = np.exp(logits[b] - logits[b].max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            class_cost = -p[:, tc]
        cost = (5 * np.abs(pred_boxes[b][:, None] - tb[None]).sum(-1) + class_cost
                - 2 * giou(pred_boxes[b], tb)) if n else np.zeros((len(logits[b]), 0))
        q_idx, t_idx = linear_sum_assignment(cost)
        target = np.full(len(logits[b]), logits.shape[-1] - (0 if focal else 1))
        target[q_idx] = tc[t_idx]
        if focal:
            onehot = np.zeros_like(logits[b])
            onehot[q_idx, tc[t_idx]] = 1
            prob = 1 / (1 + np.exp(-logits[b]))
            ce = -(onehot * np.log(prob) + (1 - onehot) * np.log(1 - prob))
            p_t = prob * onehot + (1 - prob) * (1 - onehot)
            focal_sum += ((0.25 * onehot + 0.75 * (1 - onehot)) * ce * (1 - p_t) ** 2).sum()
        else:
            log_p = logits[b] - logits[b].max(-1, keepdims=True)
            log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
            w = np.where(target == logits.shape[-1] - 1, eos_coef, 1.0)
            ce_num += (-log_p[np.arange(len(target)), target] * w).sum()
            ce_den += w.sum()
        if n:
            l1 += np.abs(pred_boxes[b][q_idx] - tb[t_idx]).sum()
            giou_loss += (1 - np.diag(giou(pred_boxes[b][q_idx], tb[t_idx]))).sum()
    class_loss = 2 * focal_sum / num_boxes if focal else ce_num / ce_den
    return class_loss + 5 * l1 / num_boxes + 2 * giou_loss / num_boxes


def _batch(rng, batch=3, queries=7, classes=4, max_targets=3, focal=False):
    logits = rng.standard_normal((batch, queries, classes + (0 if focal else 1))).astype(np.float32)
    pred = rng.uniform(0.2, 0.6, (batch, queries, 4)).astype(np.float32)
    target_classes = np.full((batch, max_targets), -1, np.int32)
    target_boxes = np.zeros((batch, max_targets, 4), np.float32)
    for b, n in enumerate([2, 0, 3][:batch]):  # the second image has no objects
        target_classes[b, :n] = rng.integers(0, classes, n)
        target_boxes[b, :n] = rng.uniform(0.1, 0.5, (n, 4))
    return logits, pred, target_classes, target_boxes


@pytest.mark.parametrize("focal", [False, True])
@pytest.mark.parametrize("matcher", ["in_graph", "scipy"])
def test_set_criterion_equals_a_direct_computation(focal, matcher):
    rng = np.random.default_rng(2)
    logits, pred, classes, boxes = _batch(rng, focal=focal)
    criterion = SetCriterion(num_classes=4, focal=focal, matcher=matcher)
    loss = float(criterion({"classes": classes, "boxes": boxes},
                           {"logits": logits, "pred_boxes": pred}))
    assert loss == pytest.approx(_numpy_detr_loss(logits, pred, classes, boxes, focal=focal),
                                 rel=1e-5)


def test_aux_layers_add_their_own_matched_losses():
    rng = np.random.default_rng(3)
    logits, pred, classes, boxes = _batch(rng)
    aux_logits, aux_pred, _, _ = _batch(np.random.default_rng(4))
    targets = {"classes": classes, "boxes": boxes}
    criterion = SetCriterion(num_classes=4)
    loss = float(criterion(targets, {"logits": logits, "pred_boxes": pred,
                                     "aux_logits": aux_logits[:, None],
                                     "aux_pred_boxes": aux_pred[:, None]}))
    expected = (_numpy_detr_loss(logits, pred, classes, boxes)
                + _numpy_detr_loss(aux_logits, aux_pred, classes, boxes))
    assert loss == pytest.approx(expected, rel=1e-5)


def test_no_objects_zero_area_and_outside_boxes_give_finite_losses():
    rng = np.random.default_rng(5)
    logits, pred, _, _ = _batch(rng)
    empty = {"classes": np.full((3, 3), -1, np.int32), "boxes": np.zeros((3, 3, 4), np.float32)}
    odd_boxes = np.array([[[0.5, 0.5, 0.0, 0.0], [1.1, -0.2, 0.5, 0.6], [0.5, 0.5, 0.2, 0.0]]] * 3,
                         np.float32)
    odd = {"classes": np.array([[0, 1, 2]] * 3, np.int32), "boxes": odd_boxes}
    for focal in (False, True):
        criterion = SetCriterion(num_classes=4, focal=focal)
        lg = logits[..., :4] if focal else logits
        for targets in (empty, odd):
            assert np.isfinite(float(criterion(targets, {"logits": lg, "pred_boxes": pred})))


def test_a_training_step_of_a_tiny_detector_lowers_the_set_loss():
    """SetPredictionModel: the criterion is the loss of fit / train_on_batch (XLA-compiled)."""
    keras.utils.set_random_seed(0)
    images = keras.Input((16, 16, 3))
    features = keras.layers.Flatten()(keras.layers.AveragePooling2D(4)(images))
    queries = 6
    logits = keras.layers.Reshape((queries, 5))(keras.layers.Dense(queries * 5)(features))
    boxes = keras.layers.Reshape((queries, 4))(
        keras.layers.Dense(queries * 4, activation="sigmoid")(features))
    detector = keras.Model(images, {"logits": logits, "pred_boxes": boxes})
    model = SetPredictionModel(detector, SetCriterion(num_classes=4))
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), jit_compile=True)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 16, 16, 3)).astype(np.float32)
    _, _, classes, target_boxes = _batch(rng, batch=3, queries=queries)
    y = {"classes": np.concatenate([classes, classes[:1]]),
         "boxes": np.concatenate([target_boxes, target_boxes[:1]])}
    before = float(model.evaluate(x, y, verbose=0, batch_size=4))
    for _ in range(5):
        model.train_on_batch(x, y)
    after = float(model.evaluate(x, y, verbose=0, batch_size=4))
    assert after < before, (before, after)


def test_match_cost_is_detr_cost():
    rng = np.random.default_rng(7)
    logits, pred, classes, boxes = _batch(rng, batch=1)
    n = 2
    cost = np_(match_cost(logits[0], pred[0], classes[0, :n], boxes[0, :n]))
    p = np.exp(logits[0]) / np.exp(logits[0]).sum(-1, keepdims=True)
    giou = np_(generalized_box_iou(box_cxcywh_to_xyxy(pred[0]), box_cxcywh_to_xyxy(boxes[0, :n])))
    expected = (5 * np.abs(pred[0][:, None] - boxes[0, :n][None]).sum(-1) - p[:, classes[0, :n]]
                - 2 * giou)
    np.testing.assert_allclose(cost, expected, rtol=1e-5, atol=1e-6)
