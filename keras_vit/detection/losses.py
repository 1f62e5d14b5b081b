"""DETR's set criterion: match every image's predictions to its targets, then classify and
regress the matched pairs (Carion et al. 2020; Deformable DETR's focal variant).

Targets come padded to a fixed count per image, as tf.data and XLA need:
``{"classes": (B, N) int32, -1 for padding, "boxes": (B, N, 4) normalised cxcywh}``.
Predictions are the detectors' dict ``{"logits", "pred_boxes"}`` (plus ``"aux_logits"`` /
``"aux_pred_boxes"`` (B, L-1, Q, ...) of the earlier decoder layers when built with
``aux_outputs=True``: each layer is matched and weighed like the last, as the references do).

Terms (each normalised by the number of target boxes of the global batch, summed over
replicas; at least 1):
* classification: cross-entropy over classes + no-object, the no-object class weighted
  ``eos_coef`` (0.1), as a weighted mean over queries (DETR, YOLOS); or, with ``focal``,
  the sigmoid focal loss (alpha 0.25, gamma 2) summed over queries and classes (Deformable
  DETR, whose logits have no no-object column);
* L1 distance of the matched boxes, and 1 - GIoU of the matched boxes.
Weights: DETR class 1, L1 5, GIoU 2; Deformable DETR class 2, L1 5, GIoU 2.
"""

import keras
from keras import ops

from keras_vit.detection.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from keras_vit.detection.matcher import (
    DEFORMABLE_COST_WEIGHTS,
    DETR_COST_WEIGHTS,
    linear_sum_assignment_in_graph,
    match_cost,
)


def _query_targets(assignment, num_queries):
    """Target index of each query (Q,), -1 when unmatched, from the query of each target."""
    one_hot = ops.one_hot(assignment, num_queries)  # (N, Q); -1 -> zeros
    matched = ops.sum(one_hot, axis=0) > 0
    return ops.where(matched, ops.cast(ops.argmax(one_hot, axis=0), "int32"), -1)


def _global_box_count(count):
    """The batch's box count summed over the replicas of a tf.distribute strategy."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            count = context.all_reduce(tf.distribute.ReduceOp.SUM, count)
            return count, context.num_replicas_in_sync
    return count, 1


class SetCriterion:
    """The loss of a set-prediction detector; ``criterion(targets, outputs)`` -> scalar.

    ``matcher="in_graph"`` (default; runs under XLA and on TPUs) or ``"scipy"`` (scipy's
    linear_sum_assignment through a host callback: TensorFlow graphs without XLA only).
    ``focal=True`` selects Deformable DETR's classification loss and matching costs.
    """

    def __init__(self, num_classes, focal=False, eos_coef=0.1, alpha=0.25, gamma=2.0,
                 matcher="in_graph", class_weight=None, bbox_weight=5.0, giou_weight=2.0):
        if matcher not in ("in_graph", "scipy"):
            raise ValueError(f"matcher must be 'in_graph' or 'scipy', got {matcher!r}")
        self.num_classes, self.focal, self.eos_coef = int(num_classes), bool(focal), eos_coef
        self.alpha, self.gamma, self.matcher = alpha, gamma, matcher
        self.class_weight = (2.0 if focal else 1.0) if class_weight is None else class_weight
        self.bbox_weight, self.giou_weight = bbox_weight, giou_weight
        self.cost_weights = DEFORMABLE_COST_WEIGHTS if focal else DETR_COST_WEIGHTS

    def match(self, logits, pred_boxes, classes, boxes):
        """(B, Q) target index per query (-1: unmatched) for every image of the batch."""
        num_queries = logits.shape[1]
        counts = ops.sum(ops.cast(classes >= 0, "int32"), axis=1)

        def one_image(args):
            image_logits, image_boxes, image_classes, image_targets, count = args
            cost = match_cost(image_logits, image_boxes, ops.maximum(image_classes, 0),
                              image_targets, focal=self.focal, alpha=self.alpha,
                              gamma=self.gamma, **self.cost_weights)
            if self.matcher == "scipy":
                assignment = _scipy_assignment(cost, count)
            else:
                assignment = linear_sum_assignment_in_graph(cost, count)
            return _query_targets(assignment, num_queries)

        return ops.map(one_image, (ops.stop_gradient(logits), ops.stop_gradient(pred_boxes),
                                   ops.cast(classes, "int32"), ops.cast(boxes, "float32"),
                                   counts))

    def layer_loss(self, logits, pred_boxes, classes, boxes, num_boxes):
        """The weighted loss of one decoder layer's predictions (before replica scaling)."""
        logits = ops.cast(logits, "float32")
        pred_boxes = ops.cast(pred_boxes, "float32")
        classes = ops.cast(classes, "int32")
        boxes = ops.cast(boxes, "float32")
        query_targets = self.match(logits, pred_boxes, classes, boxes)  # (B, Q)
        matched = query_targets >= 0
        safe = ops.maximum(query_targets, 0)
        matched_classes = ops.take_along_axis(ops.maximum(classes, 0), safe, axis=1)
        matched_boxes = ops.take_along_axis(boxes, ops.expand_dims(safe, -1), axis=1)
        weight = ops.cast(matched, "float32")
        if self.focal:
            onehot = ops.one_hot(matched_classes, logits.shape[-1]) * ops.expand_dims(weight, -1)
            prob = ops.sigmoid(logits)
            ce = -(onehot * ops.log_sigmoid(logits) + (1 - onehot) * ops.log_sigmoid(-logits))
            p_t = prob * onehot + (1 - prob) * (1 - onehot)
            alpha_t = self.alpha * onehot + (1 - self.alpha) * (1 - onehot)
            class_loss = ops.sum(alpha_t * ce * (1 - p_t) ** self.gamma) / num_boxes
        else:
            no_object = logits.shape[-1] - 1
            target = ops.where(matched, matched_classes, no_object)
            ce = keras.losses.sparse_categorical_crossentropy(target, logits, from_logits=True)
            class_weights = ops.where(matched, 1.0, self.eos_coef)
            class_loss = ops.sum(ce * class_weights) / ops.sum(class_weights)
        l1 = ops.sum(ops.sum(ops.abs(pred_boxes - matched_boxes), axis=-1) * weight) / num_boxes
        giou = ops.diagonal(generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes),
                                                box_cxcywh_to_xyxy(matched_boxes)),
                            axis1=-2, axis2=-1)
        giou_loss = ops.sum((1.0 - giou) * weight) / num_boxes
        return (self.class_weight * class_loss + self.bbox_weight * l1
                + self.giou_weight * giou_loss)

    def __call__(self, targets, outputs):
        classes, boxes = targets["classes"], targets["boxes"]
        local = ops.sum(ops.cast(ops.cast(classes, "int32") >= 0, "float32"))
        total, replicas = _global_box_count(local)
        num_boxes = ops.maximum(total, 1.0)
        loss = self.layer_loss(outputs["logits"], outputs["pred_boxes"], classes, boxes,
                               num_boxes)
        if "aux_logits" in outputs:
            for layer in range(outputs["aux_logits"].shape[1]):
                loss = loss + self.layer_loss(outputs["aux_logits"][:, layer],
                                              outputs["aux_pred_boxes"][:, layer], classes,
                                              boxes, num_boxes)
        # Keras divides each replica's loss by the replica count: the box count above is
        # global, so each replica's share is scaled back up.
        return loss * replicas


def _scipy_assignment(cost, count):
    """scipy's assignment through a TensorFlow host callback: (N,) query of each target."""
    import numpy as np
    import tensorflow as tf

    from keras_vit.detection.matcher import hungarian_match

    def solve(cost_np, count_np):
        n = cost_np.shape[1]
        result = np.full(n, -1, np.int32)
        queries, targets = hungarian_match(cost_np[:, :int(count_np)])
        result[targets] = queries
        return result

    assignment = tf.numpy_function(solve, [cost, count], tf.int32, stateful=False)
    return tf.ensure_shape(assignment, (cost.shape[1],))


class SetPredictionModel(keras.Model):
    """A detector with its set criterion as the loss, for ``fit`` / ``train_on_batch``:
    ``y`` is the padded targets dict. The detector itself is what gets saved and exported."""

    def __init__(self, detector, criterion, **kwargs):
        super().__init__(**kwargs)
        self.detector, self.criterion = detector, criterion

    def call(self, inputs, training=False):
        return self.detector(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = self.criterion(y, y_pred)
        if self.losses:
            loss = loss + ops.sum(ops.stack(self.losses))
        return loss
