"""docs/adding_a_family.md's one-file family, run as written in a fresh process: it
registers, builds at its default and another size, trains a step, keeps its outputs
through a safe-mode .keras round trip, and gives features_only maps."""

import os
import re

import app_process

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "adding_a_family.md")

CHECK = r"""
import sys
import numpy as np
import keras
sys.path.insert(0, sys.argv[1])
import example_family  # noqa: F401  (registers example_former_s12)
import keras_vit

assert keras_vit.get_model_config("example_former_s12")["family"] == "example_family"
assert keras_vit.create_model("example_former_s12").output_shape == (None, 1000)
model = keras_vit.create_model("example_former_s12", img_size=32, patch_size=8, embed_dim=16,
                               depth=2, num_classes=4)
x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32")
y = np.array([0, 1, 2, 3])
model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(True))
before = float(model.evaluate(x, y, verbose=0))
model.train_on_batch(x, y)
after = float(model.evaluate(x, y, verbose=0))
assert after < before, (before, after)
path = sys.argv[1] + "/m.keras"
model.save(path)
again = keras.saving.load_model(path, safe_mode=True)
np.testing.assert_allclose(np.asarray(again(x)), np.asarray(model(x)), atol=1e-6)
features = keras_vit.create_model("example_former_s12", img_size=64, patch_size=8,
                                  embed_dim=16, depth=3, features_only=True, out_indices=2)
maps = features(np.zeros((1, 64, 64, 3), "float32"))
assert [tuple(m.shape) for m in maps] == [(1, 8, 8, 16)] * 2
print("ok", before, after)
"""


def test_the_documented_family_file_works_as_written(tmp_path):
    text = open(DOC).read()
    code = re.search(r"## A family in one file.*?```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "example_family.py").write_text(code)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    run = app_process.run_app(None, str(tmp_path), code=CHECK, env=env)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
