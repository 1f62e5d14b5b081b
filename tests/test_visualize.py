"""apps/visualize.py: attention rollout checked against the formula written out in numpy,
the attention maps against the blocks' own outputs, and the app's PNG overlays."""

import importlib.util
import os

import keras
import numpy as np
import pytest
from keras import ops

import app_process
import keras_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)


@pytest.fixture(scope="module")
def visualize():
    spec = importlib.util.spec_from_file_location("keras_vit_visualize_app",
                                                  os.path.join(ROOT, "apps", "visualize.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_vit():
    keras.utils.set_random_seed(1)
    return keras_vit.create_model("vit_tiny_patch16_224", **TINY_VIT)


def numpy_rollout(maps, num_prefix, use_class_token):
    """Abnar & Zuidema 2020 as written: per layer, the heads' mean plus the identity, each row
    divided by its sum; the product from the first layer to the last; one sample at a time."""
    out = []
    for b in range(maps[0].shape[0]):
        n = maps[0].shape[-1]
        rollout = np.eye(n)
        for attn in maps:
            a = sum(attn[b, h] for h in range(attn.shape[1])) / attn.shape[1]
            a = a + np.eye(n)
            for i in range(n):
                a[i] = a[i] / a[i].sum()
            rollout = a @ rollout
        if use_class_token:
            relevance = rollout[0, num_prefix:]
        else:
            relevance = rollout[num_prefix:, num_prefix:].sum(axis=0) / (n - num_prefix)
        grid = int(round(np.sqrt(len(relevance))))
        out.append(relevance.reshape(grid, grid))
    return np.stack(out)


def test_attention_maps_are_the_blocks_attention(visualize, tiny_vit):
    """Each map, applied to the block's values and projected, gives the block's attention
    output: the probabilities are the ones the model uses."""
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")
    blocks = visualize.global_attention_blocks(tiny_vit)
    assert [b.name for b in blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    maps = visualize.attention_maps(tiny_vit, blocks, images)
    inputs = keras.Model(tiny_vit.input, [b.input for b in blocks])(images)
    for block, x, probs in zip(blocks, inputs, maps):
        assert probs.shape == (2, 2, 17, 17)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        h = block.norm1(x)
        _, _, v = block.attn.project_qkv(h)
        mixed = ops.reshape(ops.transpose(ops.matmul(probs.astype("float32"), v), (0, 2, 1, 3)),
                            (2, 17, 32))
        np.testing.assert_allclose(np.asarray(block.attn.proj(mixed)),
                                   np.asarray(block.attn(h)), atol=1e-5)


def test_rollout_matches_the_formula(visualize, tiny_vit):
    images = np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype("float32")
    blocks = visualize.global_attention_blocks(tiny_vit)
    maps = visualize.attention_maps(tiny_vit, blocks, images)
    assert visualize.prefix_tokens(tiny_vit, 17) == (1, True)
    for use_class_token in (True, False):
        got = visualize.attention_rollout(maps, 1, use_class_token)
        want = numpy_rollout(maps, 1, use_class_token)
        assert got.shape == (3, 4, 4)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # not a trivial map: the [CLS] row differs between patches and between images
    rollout = visualize.attention_rollout(maps, 1, True)
    assert rollout.std(axis=(1, 2)).min() > 0 and np.abs(rollout[0] - rollout[1]).max() > 0


def test_hierarchical_models_get_grad_cam_on_the_last_stage(visualize):
    keras.utils.set_random_seed(2)
    model = keras_vit.create_model("pvt_v2_b0", img_size=64, embed_dims=(8, 16, 24, 32),
                                   num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2),
                                   depths=(1, 1, 1, 1), num_classes=5)
    assert visualize.global_attention_blocks(model) == []
    assert tuple(visualize.last_stage_output(model).shape) == (None, 4, 32)  # 2x2 tokens
    images = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype("float32")
    cam = visualize.grad_cam(model, images)
    assert cam.shape == (2, 2, 2) and (cam >= 0).all()


def run_visualize(*args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    proc = app_process.run_app("visualize.py", *args, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_app_writes_rollout_and_grad_cam_pngs(tmp_path, tiny_vit):
    from PIL import Image

    vit_path = str(tmp_path / "vit.keras")
    tiny_vit.save(vit_path)
    proc = run_visualize(f"--model_path={vit_path}", "--num_images=2",
                         f"--output_dir={tmp_path}/vit")
    written = sorted(os.listdir(tmp_path / "vit"))
    assert len(written) == 2 and all(f.endswith("_rollout.png") for f in written), written
    assert "2 rollout overlays" in proc.stdout

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 40, 3), np.uint8)).save(photo)
    swin = keras_vit.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=24,
                                  depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=5)
    swin_path = str(tmp_path / "swin.keras")
    swin.save(swin_path)
    run_visualize(f"--model_path={swin_path}", f"--images={tmp_path}/*.png",
                  f"--output_dir={tmp_path}/swin")
    assert os.listdir(tmp_path / "swin") == ["photo_gradcam.png"]
    with Image.open(tmp_path / "swin" / "photo_gradcam.png") as image:
        assert image.format == "PNG" and image.size[0] > 300
