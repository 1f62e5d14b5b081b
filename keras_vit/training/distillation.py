"""DeiT distillation (Touvron et al. 2021): a student learns the labels and a frozen teacher.

hard: L = 1/2 CE(student_cls, y) + 1/2 CE(student_dist, argmax teacher)
soft: L = (1 - alpha) CE(student_cls, y) + alpha tau^2 KL(softmax(teacher/tau) || softmax(student_dist/tau))
Distilled students (DeiT/PiT ``distilled_training=True``) give the distillation
head's logits separately; other students use their one head for both terms.
"""

import keras
from keras import ops


class DistillationModel(keras.Model):
    """Wraps a student and a frozen teacher; ``fit`` trains the student with the DeiT loss."""

    def __init__(self, student, teacher, mode="hard", alpha=0.5, tau=1.0, label_smoothing=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        if mode not in ("hard", "soft"):
            raise ValueError(f"distillation must be 'hard' or 'soft', got {mode!r}")
        self.student, self.teacher = student, teacher
        self.teacher.trainable = False
        self.mode, self.alpha, self.tau = mode, float(alpha), float(tau)
        self.label_smoothing = float(label_smoothing)

    def call(self, x, training=False):
        return self.student(x, training=training)

    def _ce(self, labels, logits):
        num_classes = logits.shape[-1]
        if len(labels.shape) == 1 or labels.shape[-1] != num_classes:
            labels = ops.one_hot(ops.cast(ops.reshape(labels, (-1,)), "int32"), num_classes)
        if self.label_smoothing:
            labels = labels * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        return ops.mean(keras.losses.categorical_crossentropy(labels, logits, from_logits=True))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        cls_logits, dist_logits = (y_pred if isinstance(y_pred, (list, tuple))
                                   else (y_pred, y_pred))
        cls_logits = ops.cast(cls_logits, "float32")
        dist_logits = ops.cast(dist_logits, "float32")
        teacher_logits = ops.stop_gradient(ops.cast(self.teacher(x, training=False), "float32"))
        base = self._ce(y, cls_logits)
        if self.mode == "hard":
            teacher_labels = ops.one_hot(ops.argmax(teacher_logits, axis=-1), dist_logits.shape[-1])
            loss = 0.5 * base + 0.5 * ops.mean(keras.losses.categorical_crossentropy(
                teacher_labels, dist_logits, from_logits=True))
        else:
            t = ops.softmax(teacher_logits / self.tau, axis=-1)
            log_s = ops.log_softmax(dist_logits / self.tau, axis=-1)
            kl = ops.sum(t * (ops.log(ops.maximum(t, 1e-12)) - log_s), axis=-1)
            loss = (1 - self.alpha) * base + self.alpha * self.tau ** 2 * ops.mean(kl)
        return loss
