"""Keras 3 on every backend: each family's smallest model gives TensorFlow's outputs under JAX.

This (TensorFlow-backend) process builds every case of tests/families.py, perturbs its
weights, saves them with an input batch and the outputs; one subprocess with
KERAS_BACKEND=jax (this file run as a script, so JAX is imported once) builds the same
configs, loads the weights and saves its outputs. Each variant (VARIANTS) then compares every output.
"""

import json
import os
import subprocess
import sys
import traceback

import keras
import numpy as np
import pytest

from families import (
    SMALLEST,
    build_smallest,
    classification_cases,
    missing_families,
    smallest_input,
)

RTOL = 1e-4  # of max(1, the output's largest magnitude)
# Each family's smallest model, the features_only pyramid (a list of maps) of the families
# whose features path is their own (the plain-token families share ViT's token-to-map path,
# run once for vit) and DeiT's two training heads: multi-output models compare every output.
PLAIN_TOKEN_FAMILIES = ("deit", "vit_conv_stem", "tnt", "xcit", "t2t_vit", "deepvit")
VARIANTS = {case: (case, {}) for case in SMALLEST}
VARIANTS.update({f"{case}-features": (case, dict(features_only=True, out_indices=(0, -1)))
                 for case in classification_cases() if case not in PLAIN_TOKEN_FAMILIES})
VARIANTS["deit-distilled_training"] = ("deit", dict(distilled_training=True))


def _build(variant):
    case, overrides = VARIANTS[variant]
    return build_smallest(case, **overrides)


def _outputs(model, x, jit=False):
    """Every output of the model as y0, y1, ... for np.savez; under JAX with ``jit``, from one
    jitted forward pass (as predict and fit run it), else eagerly, op by op."""
    if jit:
        import jax

        def forward(trainable, non_trainable, x):
            # Outer scope: the variables were created deferred and then loaded; the
            # stateless call must not try to initialise them again on exit.
            with keras.StatelessScope(initialize_variables=False):
                return model.stateless_call(trainable, non_trainable, x, training=False)[0]

        outputs = keras.tree.flatten(jax.jit(forward)(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables], x))
    else:
        outputs = keras.tree.flatten(model(x, training=False))  # lists and detectors' dicts
    return {f"y{i}": keras.ops.convert_to_numpy(o) for i, o in enumerate(outputs)}


def _perturb(model, seed=0):
    """Moves every weight off its initial value: zero biases, unit norms and 1e-5 LayerScales
    would leave whole branches untested, and fresh BatchNorm statistics are the identity."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if "float" not in str(w.dtype):
            continue
        if w.path.endswith("moving_variance"):
            w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
        else:
            w.assign(keras.ops.convert_to_numpy(w) + 0.05 * rng.standard_normal(w.shape))


def test_every_family_has_a_smallest_config():
    assert missing_families() == [], "add the family to tests/families.py SMALLEST"


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    """The TF outputs written here, then the JAX subprocess's results over the same files."""
    work = tmp_path_factory.mktemp("jax_backend")
    keras.utils.set_random_seed(0)  # module scope: set up before conftest's per-test seed
    for variant, (case, _) in VARIANTS.items():
        model = _build(variant)
        _perturb(model)
        x = smallest_input(case)
        model.save_weights(str(work / f"{variant}.weights.h5"))
        np.savez(work / f"{variant}.tf.npz", x=x, **_outputs(model, x))
        keras.backend.clear_session()
    # Compiling is most of the subprocess's time, not running (tiny inputs); LLVM's
    # optimisation level 0 takes 0.6x the CPU of the default on the jitted forward passes.
    env = dict(os.environ, KERAS_BACKEND="jax", CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                          + " --xla_backend_optimization_level=0").strip())
    proc = subprocess.run([sys.executable, __file__, str(work)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(work / "jax_results.json") as f:
        results = json.load(f)
    print("JAX CPU s per variant:", json.dumps(results["seconds"]))
    return work, results


def test_vit_matches_tensorflow_under_jax_with_default_xla_flags(jax_run):
    """What users run: JAX with XLA's default optimisation (the run above turns it off for
    speed), on ViT's variant, against the same TensorFlow outputs."""
    work, _ = jax_run
    env = dict(os.environ, KERAS_BACKEND="jax", CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, str(work), "jax_default", "vit"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(work / "jax_default_results.json") as f:
        assert json.load(f)["errors"] == {}
    tf_out, jax_out = np.load(work / "vit.tf.npz"), np.load(work / "vit.jax_default.npz")
    ref = tf_out["y0"]
    # the module's tolerance: RTOL of the output's scale
    assert np.max(np.abs(jax_out["y0"] - ref)) <= RTOL * max(1.0, float(np.max(np.abs(ref))))


def test_keras_vit_does_not_import_tensorflow_under_jax(jax_run):
    _, results = jax_run
    assert results["tensorflow_imported"] == [], results["tensorflow_imported"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_jax_backend_matches_tensorflow(variant, jax_run):
    work, results = jax_run
    assert results["errors"].get(variant) is None, results["errors"][variant]
    tf_out = np.load(work / f"{variant}.tf.npz")
    jax_out = np.load(work / f"{variant}.jax.npz")
    names = [n for n in tf_out.files if n != "x"]
    assert sorted(jax_out.files) == sorted(names)
    for name in names:
        ref = tf_out[name]
        assert jax_out[name].shape == ref.shape
        scale = float(np.max(np.abs(ref)))
        diff = float(np.max(np.abs(jax_out[name] - ref)))
        print(f"{variant} output {name}: max abs diff {diff:.2e}, output scale {scale:.3g}")
        assert diff <= RTOL * max(1.0, scale), f"{variant} {name}: {diff:.2e} (scale {scale:.3g})"


def _run_under_jax(work, suffix="jax", variants=None):
    """The subprocess: ``variants`` (default all) under the JAX backend, outputs in
    <variant>.<suffix>.npz, results in <suffix>_results.json. The all-variants run jits each
    forward pass (one XLA program per model: a third of the CPU of compiling every op
    eagerly); the default-flags run calls the model eagerly, the other way users run it."""
    assert keras.backend.backend() == "jax"
    import keras_vit  # noqa: F401  (first, to see whether it imports TensorFlow)

    import time

    results = {"errors": {}, "tensorflow_imported": [], "seconds": {}}
    if "tensorflow" in sys.modules:
        results["tensorflow_imported"].append("import keras_vit")
    for variant in variants or VARIANTS:
        start = time.process_time()
        try:
            # Deferred initial values: load_weights replaces them, and under JAX each
            # initializer compiles an XLA program per shape (about a second each).
            with keras.StatelessScope(initialize_variables=False):
                model = _build(variant)
            model.load_weights(os.path.join(work, f"{variant}.weights.h5"))
            x = np.load(os.path.join(work, f"{variant}.tf.npz"))["x"]
            np.savez(os.path.join(work, f"{variant}.{suffix}.npz"), **_outputs(model, x, jit=suffix == "jax"))
        except Exception:  # noqa: BLE001  (reported per variant, the others still run)
            results["errors"][variant] = traceback.format_exc()
        keras.backend.clear_session()
        results["seconds"][variant] = time.process_time() - start  # CPU s, to choose cuts
        if "tensorflow" in sys.modules and not results["tensorflow_imported"]:
            results["tensorflow_imported"].append(f"building {variant}")
    with open(os.path.join(work, f"{suffix}_results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _run_under_jax(sys.argv[1], *sys.argv[2:3], variants=sys.argv[3:] or None)
