import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vit.training.optimizers import AdamW
from keras_vit.training.schedules import WarmupSchedule


# The fused kernel evaluates Keras' formula as one expression (another rounding order) and
# the decay as one multiply by lr * wd instead of two: after 4 steps the weights (|w| <= ~1)
# differ from Keras' by up to 1.2e-6 (measured). Any change to the formula moves them far
# more: weight decay 0.04 instead of 0.05 by 3.5e-5, beta_2 0.99 by 8e-4, epsilon 1e-6 by
# 1.9e-3 (measured with Keras' AdamW on the same model and steps).
SAME_AS_KERAS = dict(rtol=1e-5, atol=2e-6)


def _trained_weights(optimizer, steps=4, jit_compile=False):
    """A small ViT's weights after ``steps`` train steps with ``optimizer`` (fixed init).
    ``jit_compile=False`` by default: the apps' default (deterministic) training runs its
    step as a graph without XLA, the case the fused kernels are for; Keras' own compile
    default ("auto") and XLA have tests of their own below."""
    from keras_vit.models.vit import vision_transformer

    keras.utils.set_random_seed(0)
    model = vision_transformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                               num_classes=4)
    model.compile(optimizer=optimizer, jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 32, 32, 3)).astype("float32"), rng.integers(0, 4, 8)
    for _ in range(steps):
        model.train_on_batch(x, y)
    return [v.numpy() for v in model.trainable_variables], model


def _both(**kwargs):
    schedule = WarmupSchedule(1e-3, 100, 2, "cosine")
    return (keras.optimizers.AdamW(schedule, **kwargs), AdamW(schedule, **kwargs))


@pytest.mark.parametrize("kwargs", [dict(weight_decay=0.05),
                                    dict(weight_decay=0.05, global_clipnorm=1.0),
                                    dict(weight_decay=0.0),
                                    dict(weight_decay=0.05, amsgrad=True)])
def test_fused_adamw_equals_keras_adamw(kwargs):
    """The fused kernels compute Keras' AdamW: after 4 steps (warm-up schedule, decay,
    clipping) every weight equals Keras' to float32 round-off (the two sum the same terms
    in a different order; Keras' own weights move by up to ~4e-3 here)."""
    ours, theirs = _both(**kwargs)
    expected, _ = _trained_weights(ours)
    got, _ = _trained_weights(theirs)
    moved = max(float(np.max(np.abs(e - g))) for e, g in zip(expected, _trained_weights(
        keras.optimizers.AdamW(1e-3, weight_decay=0.05), steps=0)[0]))
    assert moved > 1e-3  # the steps moved the weights: the comparison means something
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, **SAME_AS_KERAS)


def test_fused_adamw_decays_excluded_variables_as_keras_does():
    """exclude_from_weight_decay (apps/compress.py's gates) holds for the fused decay."""
    keras_opt, fused = _both(weight_decay=0.5)
    for opt in (keras_opt, fused):
        opt.exclude_from_weight_decay(var_names=["bias"])
    expected, _ = _trained_weights(keras_opt, steps=2)
    got, _ = _trained_weights(fused, steps=2)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, **SAME_AS_KERAS)


def test_fused_adamw_under_xla_equals_the_graph():
    """jit_compile (the apps' --nodeterministic): XLA has kernels for the fused ops."""
    expected, _ = _trained_weights(AdamW(1e-3, weight_decay=0.05))
    got, _ = _trained_weights(AdamW(1e-3, weight_decay=0.05), jit_compile=True)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, **SAME_AS_KERAS)


def test_fused_adamw_with_keras_compile_defaults_equals_keras():
    """compile()'s default jit_compile ("auto") with the optimizer's defaults, as a user
    compiling a model with it gets."""
    expected, _ = _trained_weights(keras.optimizers.AdamW(), jit_compile="auto")
    got, _ = _trained_weights(AdamW(), jit_compile="auto")
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, **SAME_AS_KERAS)


def test_one_fused_update_per_variable_in_the_graph():
    """What makes it fast: per variable one ResourceApplyAdam and one decay kernel, no
    element-wise assignment chains (Keras' form, per variable: two AssignAdds for the
    moments, an AssignSub for the step and one for the decay)."""
    variables = [keras.Variable(np.ones((4, 3), "float32")), keras.Variable(np.ones(3, "float32"))]
    grads = [tf.ones((4, 3)), tf.ones(3)]

    def op_types(optimizer):
        optimizer.build(variables)
        graph = tf.function(lambda: optimizer.apply(grads, variables)).get_concrete_function().graph
        return [op.type for op in graph.get_operations()]

    fused, plain = op_types(AdamW(1e-3)), op_types(keras.optimizers.AdamW(1e-3))
    assert fused.count("ResourceApplyAdam") == 2 and fused.count("ResourceApplyGradientDescent") == 2
    assert "AssignSubVariableOp" not in fused and "AssignAddVariableOp" not in fused
    assert plain.count("AssignSubVariableOp") == 4 and plain.count("AssignAddVariableOp") == 4
    assert "ResourceApplyAdam" not in plain


def test_checkpoints_move_between_keras_and_fused_adamw(tmp_path):
    """Same variables under the same paths: a run resumes from a checkpoint that Keras'
    AdamW wrote (runs from before the fused optimizer), and the .keras file round-trips."""
    _, model = _trained_weights(keras.optimizers.AdamW(1e-3, weight_decay=0.05), steps=2)
    path = str(tmp_path / "ckpt")
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(path)
    _, resumed = _trained_weights(AdamW(1e-3, weight_decay=0.05), steps=1)
    def paths(optimizer):  # without the optimizer's own name, which a process uniquifies
        return [v.path.split("/", 1)[1] for v in optimizer.variables]

    assert paths(resumed.optimizer) == paths(model.optimizer)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).read(path).assert_consumed()
    for a, b in zip(model.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    resumed.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is AdamW


JAX_PROGRAM = """
import numpy as np, keras
from keras_vit.training.optimizers import AdamW

def weights(optimizer):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5), keras.layers.Dense(3)])
    model.compile(optimizer=optimizer, loss="mse")
    x, y = np.random.default_rng(0).standard_normal((2, 8, 6)).astype("float32")[0], np.ones((8, 3))
    for _ in range(3):
        model.train_on_batch(x, y)
    return [v.numpy() for v in model.weights]

ours, theirs = weights(AdamW(1e-2, weight_decay=0.1)), weights(keras.optimizers.AdamW(1e-2, weight_decay=0.1))
print(keras.backend.backend(), max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs)))
"""


def test_fused_adamw_is_keras_adamw_on_jax():
    """On JAX (the device machines have no TensorFlow) it is Keras' AdamW, untouched."""
    import subprocess
    import sys

    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", JAX_PROGRAM], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    backend, diff = out.stdout.split()[-2:]
    assert backend == "jax" and float(diff) == 0.0
