"""Reduced precision: the models under a Keras dtype policy ("mixed_bfloat16": float32
variables, bfloat16 matmuls and activations; LayerNorm and the attention softmax still
compute in float32, where the agreement with float32 needs it)."""

import contextlib

import keras

# --precision of the apps -> the Keras dtype policy it builds models under.
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def policy_name(precision_or_policy):
    """A --precision value ("bfloat16") or a policy name ("mixed_bfloat16") -> the policy."""
    name = PRECISIONS.get(precision_or_policy, precision_or_policy)
    if name not in PRECISIONS.values():
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)} or the Keras policies "
                         f"{sorted(PRECISIONS.values())}, got {precision_or_policy!r}")
    return name


@contextlib.contextmanager
def dtype_policy_scope(policy):
    """Layers created inside compute under ``policy`` (sub-layers a layer creates itself
    take the global policy, so a per-layer dtype would not reach them)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy_name(policy))
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _with_policy(config, policy):
    """``config`` (nested dicts and lists) with every serialized DTypePolicy set to ``policy``."""
    if isinstance(config, list):
        return [_with_policy(c, policy) for c in config]
    if not isinstance(config, dict):
        return config
    if config.get("class_name") == "DTypePolicy" and isinstance(config.get("config"), dict):
        return dict(config, config=dict(config["config"], name=policy))
    return {k: _with_policy(v, policy) for k, v in config.items()}


def with_dtype_policy(model, policy):
    """The same model (architecture and weights) computing under ``policy`` ("bfloat16",
    "mixed_bfloat16", "float32", ...): rebuilt from its config with every layer's policy
    replaced, its weights copied (mixed policies keep float32 variables, so the copy is
    exact). The input stays float32: the first layer casts it.

    Keep the float32 model as the file and apply this after loading it: a .keras file of the
    copy restores each top-level layer's policy, but the sub-layers a layer creates itself
    take the global policy when loaded (float32)."""
    policy = policy_name(policy)
    serialized = _with_policy(keras.saving.serialize_keras_object(model), policy)
    with dtype_policy_scope(policy):
        clone = keras.saving.deserialize_keras_object(serialized)
    clone.set_weights(model.get_weights())
    return clone


# The CPU units that run bfloat16 matmuls natively (oneDNN uses them; without one it emulates).
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def reduced_precision_note(policy, cpu_flags=None, accelerators=None):
    """A one-line warning when ``policy`` (a --precision value or a Keras policy) computes
    in bfloat16 on a CPU without a bfloat16 unit: TensorFlow then emulates it, at about
    0.9-1.0x float32's speed instead of ~2x (benchmarks/README.md). None when it has one,
    when a GPU or TPU does the work, or when the flags are unknown. ``cpu_flags`` and
    ``accelerators`` (lists) default to this machine's."""
    if "bfloat16" not in policy_name(policy):
        return None
    if accelerators is None:
        import tensorflow as tf

        accelerators = (tf.config.list_physical_devices("GPU")
                        + tf.config.list_physical_devices("TPU"))
    if accelerators:
        return None
    if cpu_flags is None:
        from keras_vit.measure import cpu_flags as read_cpu_flags

        cpu_flags = read_cpu_flags()
    if cpu_flags is None or set(BFLOAT16_CPU_FLAGS) & set(cpu_flags):
        return None
    return ("bfloat16 on this CPU is emulated: it has neither AVX-512 BF16 nor AMX "
            "(avx512_bf16, amx_bf16 are not among its flags), so mixed_bfloat16 runs at "
            "about 0.9-1.0x float32 speed; float32 is the faster choice here")
