"""AdamW whose TensorFlow update is one fused kernel per variable.

Keras' AdamW writes each variable's update as ~12 element-wise ops (the moments, their
assignments, the step) plus 3 for the decoupled weight decay: each op one pass over the
whole weight. XLA fuses them; the tf.function graphs that deterministic training runs (the
apps' default: Keras does not XLA-compile under op determinism) run them one by one.
TensorFlow's ResourceApplyAdam computes Keras' update (the same formula: TF's Adam is where
Keras' came from) in one pass, and ResourceApplyGradientDescent the decay in one.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable("keras_vit")
class AdamW(keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` with the same variables, arguments and numbers; on the
    TensorFlow backend its dense float updates run as TensorFlow's fused Adam kernel (the
    variables, checkpoints and other backends are Keras')."""

    def _fused(self, variable, gradient=None):
        if keras.backend.backend() != "tensorflow":  # (JAX machines have no TensorFlow)
            return False
        import tensorflow as tf

        return (not self.amsgrad and not isinstance(gradient, tf.IndexedSlices)
                and variable.dtype in ("float16", "bfloat16", "float32", "float64"))

    def update_step(self, gradient, variable, learning_rate):
        if not self._fused(variable, gradient):
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        dtype = variable.dtype
        local_step = ops.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].handle,
            v=self._velocities[index].handle,
            beta1_power=ops.power(beta_1, local_step), beta2_power=ops.power(beta_2, local_step),
            lr=ops.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
            epsilon=ops.cast(self.epsilon, dtype), grad=ops.cast(gradient, dtype))

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None or keras.backend.backend() != "tensorflow":
            return super()._apply_weight_decay(variables)
        import tensorflow as tf

        def decay(variable):  # variable -= lr * wd * variable, in one pass
            if self._use_weight_decay(variable):
                rate = (ops.cast(self.learning_rate, variable.dtype)
                        * ops.cast(self.weight_decay, variable.dtype))
                tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=rate,
                                                        delta=variable.read_value())

        def apply(distribution, variables):
            for variable in variables:
                if isinstance(variable, keras.Variable):
                    variable = variable.value
                distribution.extended.update(variable, decay, group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            apply, self._distribution_strategy, variables)
