"""Learning-rate schedules: linear warmup then cosine decay or constant (DeiT/timm recipe), or
polynomial decay (the segmentation references' ``poly``)."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_vit")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 over ``warmup_steps``, then ``cosine`` decay to ``min_lr``,
    ``constant``, or ``poly``: (base - min) * (1 - progress) ** power + min, mmseg's
    PolyLR (SegFormer: power 1.0, min 0; SETR: power 0.9)."""

    SCHEDULES = ("cosine", "constant", "poly")

    def __init__(self, base_lr, total_steps, warmup_steps=0, schedule="cosine", min_lr=0.0,
                 power=1.0):
        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule must be one of {self.SCHEDULES}, got {schedule!r}")
        self.base_lr, self.total_steps = float(base_lr), int(max(total_steps, 1))
        self.warmup_steps, self.schedule, self.min_lr = int(warmup_steps), schedule, float(min_lr)
        self.power = float(power)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = self.base_lr * (step + 1) / max(self.warmup_steps, 1)
        if self.schedule == "constant":
            after = ops.convert_to_tensor(self.base_lr, "float32")
        else:
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            if self.schedule == "poly":
                after = self.min_lr + (self.base_lr - self.min_lr) * (1.0 - progress) ** self.power
            else:
                after = self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (
                    1.0 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup_steps, warm, after)

    def get_config(self):
        return dict(base_lr=self.base_lr, total_steps=self.total_steps,
                    warmup_steps=self.warmup_steps, schedule=self.schedule, min_lr=self.min_lr,
                    power=self.power)
