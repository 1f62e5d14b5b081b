"""Shared set-up of the apps: oneDNN on before TensorFlow loads, quiet logs, CPU-only option."""

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
