"""Shared set-up of the apps: oneDNN on before TensorFlow loads, quiet logs, flag errors, and
the one way an app turns a flag into a model."""

import json
import os


def prepare_environment():
    # oneDNN doubles CPU matmul throughput on CPUs where TF leaves it off (DESIGN.md); the
    # user's own setting wins. Must happen before TensorFlow is imported.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def fail(message):
    """Prints a flag/usage error and exits non-zero, before any work."""
    import sys

    from absl import logging

    logging.error(message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_model_args(text):
    """--model_args (builder overrides) as a dict; a flag error unless it is a JSON object."""
    try:
        model_args = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"--model_args is not valid JSON: {e}")
    if not isinstance(model_args, dict):
        fail("--model_args must be a JSON object")
    return model_args


def model_dir_of(path):
    """The folder a trained model's files sit in: the model_dir, or the .keras file's folder."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def read_preprocessing(path):
    """The training run's preprocessing.json next to the model at ``path`` (image size,
    mean/std, crop, interpolation, class names), or {} when it has none (or is a name)."""
    if not os.path.exists(path):
        return {}
    prep_path = os.path.join(model_dir_of(path), "preprocessing.json")
    if not os.path.exists(prep_path):
        return {}
    with open(prep_path) as f:
        return json.load(f)


def load_model(spec, flag="--model_path", img_size=None, model_args=None):
    """The model a flag names, or a flag error: a .keras file; a training model_dir (its
    model.keras, else the model rebuilt with its last checkpoint); or a registered name,
    built at ``img_size`` (default: its own) with the builder overrides ``model_args``."""
    from keras_vit.registry import create_model, list_models
    from keras_vit.training.trainer import load_trained_model

    if os.path.exists(spec):
        if model_args:
            fail(f"--model_args change a registered architecture; {flag} {spec!r} is a file")
        try:
            model = load_trained_model(spec)
        except ValueError as e:
            fail(f"{flag}: {e}")
        if img_size and model.input_shape[1] != img_size:
            fail(f"--img_size={img_size}, but {spec!r} takes {model.input_shape[1]} px images")
        return model
    if spec not in list_models() and (os.sep in spec or spec.endswith(".keras")):
        fail(f"{flag} {spec!r} does not exist")
    try:
        return create_model(spec, **dict(model_args or {}, **({"img_size": img_size}
                                                              if img_size else {})))
    except ValueError as e:  # an unknown name (with the closest ones) or an invalid size
        fail(f"{flag}: {e}")
