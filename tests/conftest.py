import os

# Before TensorFlow loads: CPU only, quiet logs, the TF backend.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import json  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(autouse=True)
def _seed_and_clear():
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


def load_fixture_index(family):
    """The parity fixtures tools/make_parity_fixtures.py wrote for a family."""
    with open(os.path.join(FIXTURES, family, "fixtures.json")) as f:
        return json.load(f)


def load_param_counts(family):
    """timm's {name: {params, num_classes}} for the family's full-size variants."""
    with open(os.path.join(FIXTURES, family, "timm_param_counts.json")) as f:
        return json.load(f)


def fixture_path(family, name):
    return os.path.join(FIXTURES, family, name)


def images(batch, size, chans=3, seed=0):
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).standard_normal((batch, h, w, chans)).astype(np.float32)
