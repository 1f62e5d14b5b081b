"""Pretrained weights by timm name, through a Hugging Face cache the tests lay out (no network).

The cache holds the vit_token_32 parity fixture (a small timm ViT) as the
model.safetensors of timm's repository for a real registered name; the model
is that name built with the fixture's small config, so loading it must give
timm's outputs of the fixture.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import fixture_path, load_fixture_index
from keras_vit.pretrained import _table
from keras_vit.registry import create_model, get_model_config, list_models, list_pretrained

FIXTURE = "vit_token_32"
MODEL = "vit_small_patch16_224"
DEFAULT_TAG = "augreg_in21k_ft_in1k"  # timm's default (first) tag of MODEL
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Families whose weights timm does not host: one model of each.
OFFICIAL_ONLY = ["pvt_tiny", "t2t_vit_7", "deepvit_s", "cmt_ti", "vit_c_1gf", "botnet_s1_50"]

LOAD_IN_FRESH_PROCESS = """
import json, sys
import numpy as np
import keras_vit
name, kwargs, x_path, out_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
model = keras_vit.create_model(name, pretrained=True, **kwargs)
np.save(out_path, np.asarray(model(np.load(x_path)["x"], training=False)))
"""


def put_in_hub_cache(cache, repo_id, filename, source):
    """Lays ``source`` out as huggingface_hub's cache holds ``filename`` of ``repo_id`` at main."""
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo_dir, "snapshots", COMMIT)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(COMMIT)
    with open(source, "rb") as src, open(os.path.join(snapshot, filename), "wb") as dst:
        dst.write(src.read())


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache in tmp_path holding the fixture as MODEL.DEFAULT_TAG."""
    cache = str(tmp_path / "hub")
    for var, value in (("HF_HOME", str(tmp_path)), ("HF_HUB_CACHE", cache),
                       ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, value)
    # huggingface_hub reads the variables once, at import: set them in this process too.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    weights = fixture_path("vit", load_fixture_index("vit")[FIXTURE]["weights"])
    put_in_hub_cache(cache, f"timm/{MODEL}.{DEFAULT_TAG}", "model.safetensors", weights)
    return cache


def small_kwargs():
    return load_fixture_index("vit")[FIXTURE]["kwargs"]


def assert_fixture_outputs(outputs):
    expected = np.load(fixture_path("vit", f"{FIXTURE}.npz"))["y0"]
    diff = float(np.max(np.abs(np.asarray(outputs) - expected)))
    assert diff <= 1e-4, f"max abs diff {diff:.2e}"


def test_tagged_name_loads_from_the_offline_cache(hub_cache):
    model = create_model(f"{MODEL}.{DEFAULT_TAG}", pretrained=True, **small_kwargs())
    x = np.load(fixture_path("vit", f"{FIXTURE}.npz"))["x"]
    assert_fixture_outputs(model(x, training=False))


def test_default_tag_loads_offline_in_a_fresh_process(hub_cache, tmp_path):
    # A user's process: only the environment variables say where the cache is and that
    # there is no network; the name has no tag, so timm's default tag is fetched.
    out = str(tmp_path / "outputs.npy")
    subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, MODEL, json.dumps(small_kwargs()),
                    fixture_path("vit", f"{FIXTURE}.npz"), out], check=True, env=dict(os.environ),
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert_fixture_outputs(np.load(out))


def test_missing_file_offline_names_the_repository_and_file(hub_cache):
    with pytest.raises(FileNotFoundError) as info:
        create_model(f"{MODEL}.augreg_in1k", pretrained=True, **small_kwargs())
    message = str(info.value)
    assert f"timm/{MODEL}.augreg_in1k" in message
    assert "model.safetensors" in message and "HF_HUB_OFFLINE" in message


@pytest.mark.parametrize("name", OFFICIAL_ONLY)
def test_families_without_hub_weights_need_the_official_checkpoint(name):
    with pytest.raises(ValueError, match="official checkpoint file"):
        create_model(name, pretrained=True)


def test_unknown_and_unresolvable_tags_are_refused():
    with pytest.raises(ValueError, match="augreg_in21k_ft_in1k"):
        create_model(f"{MODEL}.in22k", pretrained=True)
    with pytest.raises(ValueError, match="timm has no weights"):
        create_model("vit_base_patch16_gap_224", pretrained=True)


def test_list_pretrained():
    assert list_pretrained("vit_small*") == [
        "vit_small_patch16_224.augreg_in1k", "vit_small_patch16_224.augreg_in21k",
        "vit_small_patch16_224.augreg_in21k_ft_in1k", "vit_small_patch16_224.dino",
        "vit_small_patch16_384.augreg_in1k", "vit_small_patch16_384.augreg_in21k_ft_in1k",
        "vit_small_patch32_224.augreg_in21k", "vit_small_patch32_224.augreg_in21k_ft_in1k",
        "vit_small_patch32_384.augreg_in21k_ft_in1k"]
    assert list_pretrained("pvt*") == [f"pvt_v2_{b}.in1k" for b in
                                       ("b0", "b1", "b2", "b2_li", "b3", "b4", "b5")]
    assert list_pretrained("swin_tiny*in22k*") == [
        "swin_tiny_patch4_window7_224.ms_in22k", "swin_tiny_patch4_window7_224.ms_in22k_ft_in1k"]
    assert list_pretrained("cmt*") == list_pretrained("t2t_vit*") == []


def test_tag_sets_the_checkpoint_config():
    in21k = get_model_config(f"{MODEL}.augreg_in21k")
    assert (in21k["num_classes"], in21k["input_size"], in21k["hf_hub_id"]) == (
        21843, 224, f"timm/{MODEL}.augreg_in21k")
    miil = get_model_config("vit_base_patch16_224_miil.in21k_ft_in1k")
    assert (miil["num_classes"], miil["mean"], miil["std"], miil["crop_pct"],
            miil["interpolation"]) == (1000, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.875, "bilinear")
    assert get_model_config("swin_base_patch4_window12_384.ms_in22k")["num_classes"] == 21841
    # A name without a tag keeps the registered config.
    assert get_model_config("vit_base_patch16_224_miil")["mean"] == (0.5, 0.5, 0.5)


def test_tagged_name_builds_the_checkpoint_head():
    tiny = dict(small_kwargs(), num_classes=None)  # None: the tag's / variant's head
    assert create_model(f"{MODEL}.augreg_in21k", **tiny).output_shape == (None, 21843)
    assert create_model(MODEL, **tiny).output_shape == (None, 1000)
    assert create_model(f"{MODEL}.dino", **tiny).output_shape == (None, 48)  # headless


def test_tag_table_matches_the_registry():
    registered = set(list_models())
    for model, entry in _table()["models"].items():
        assert model in registered, model
        assert entry["default_tag"] in entry["tags"] or not entry["tags"], model
        for tag in entry["tags"].values():
            assert tag["hf_hub_id"].startswith("timm/"), tag


def test_other_num_classes_keeps_the_pretrained_body_with_a_new_head(hub_cache):
    """Fine-tuning as with timm: pretrained=True, num_classes=5 loads every weight but the
    10-class classifier, which keeps its initialisation."""
    x = np.load(fixture_path("vit", f"{FIXTURE}.npz"))["x"]
    kwargs = {k: v for k, v in small_kwargs().items() if k != "num_classes"}
    body = create_model(f"{MODEL}.{DEFAULT_TAG}", pretrained=True, num_classes=0, **kwargs)
    tuned = create_model(f"{MODEL}.{DEFAULT_TAG}", pretrained=True, num_classes=5, **kwargs)
    assert tuned.output_shape == (None, 5)
    for var in tuned.weights:
        if not var.path.startswith("head/"):
            ref = next(v for v in body.weights if v.path == var.path)
            np.testing.assert_array_equal(np.asarray(var), np.asarray(ref))
    head = tuned.get_layer("head")
    features = body(x, training=False)
    expected = np.asarray(features) @ np.asarray(head.kernel) + np.asarray(head.bias)
    np.testing.assert_allclose(np.asarray(tuned(x, training=False)), expected, atol=1e-5)
