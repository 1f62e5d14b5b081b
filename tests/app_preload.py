"""Imported once by tests/app_process.py's fork server: what every app imports at start, as
the apps import it (apps/common.py's environment, jax and matplotlib.pyplot hidden while
TensorFlow loads). No TensorFlow op runs here, so each forked app starts the runtime itself."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "apps"))
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as common.prepare_environment
os.environ["KERAS_BACKEND"] = "tensorflow"

import common  # noqa: E402  (apps/common.py)

# TensorFlow's start-up lines (no CUDA driver, CPU notices) would land in pytest's stderr.
_stderr = os.dup(2)
os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
try:
    with common._hidden_modules(common._UNNEEDED_AT_IMPORT):
        import tensorflow  # noqa: E402,F401
finally:
    os.dup2(_stderr, 2)
    os.close(_stderr)

import keras  # noqa: E402,F401
from absl import app, flags, logging  # noqa: E402,F401

import keras_vit  # noqa: E402,F401
