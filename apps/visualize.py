"""Where a trained model looks: attention rollout for ViT-style models, Grad-CAM for
hierarchical ones, written as PNG overlays.

    python apps/visualize.py --model_path=runs/main_job --images='photos/*.jpg' \
        --output_dir=runs/main_job/visualize

--model_path is a .keras file, a training model_dir or a registered name. Without --images,
the first --num_images validation images of the embedded shapes dataset are shown (the
run's seed and image size).

ViT/DeiT-style models (global multi-head self-attention blocks over one token sequence):
attention rollout (Abnar & Zuidema 2020). Each block's attention probabilities are computed
again from the block's input with the block's own weights (norm1, qkv, softmax(q k^T *
scale)); they are averaged over heads, the identity is added (the residual connection) and
rows renormalised, and the blocks' matrices are multiplied from the first to the last. The
map is the [CLS] token's row over the patch tokens, or, for models pooled without a class
token, the mean of the patch tokens' rows. Hierarchical models (Swin, PVT, Twins, ...): and
any model without such blocks: Grad-CAM (Selvaraju et al. 2017) on the last stage's feature
map, for the predicted class.
"""

import glob
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (fail, load_model, model_dir_of, prepare_environment,  # noqa: E402
                    read_preprocessing, run_data_settings)

prepare_environment()

from absl import app, flags  # noqa: E402

from keras_vit.models.introspect import (block_attention,  # noqa: E402,F401
                                         global_attention_blocks, prefix_tokens)

F = flags.FLAGS
flags.DEFINE_string("model_path", None, "A .keras file, a training model_dir or a registered "
                    "name.", required=True)
flags.DEFINE_list("images", [], "Image files or globs (JPEG/PNG/BMP/GIF); default: shapes "
                  "validation images.")
flags.DEFINE_integer("num_images", 4, "How many shapes validation images without --images.")
flags.DEFINE_string("output_dir", None, "Where the PNGs go (default: MODEL_DIR/visualize, or "
                    "visualize/ for a registered name).")
flags.DEFINE_enum("method", "auto", ["auto", "rollout", "gradcam"],
                  "auto: rollout for ViT-style models, Grad-CAM for the others.")
flags.DEFINE_integer("seed", None, "Seed of the shapes images (default: the run's, else 0).")


# -- attention rollout ------------------------------------------------------------------

def attention_maps(model, blocks, images):
    """Each block's attention probabilities (B, heads, N, N) on ``images``: the block's input
    from a sub-model, then the block's own attention math on it (pre- or post-norm)."""
    import keras
    import numpy as np

    inputs = keras.Model(model.input, [block.input for block in blocks])(images)
    inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return [np.asarray(block_attention(block, x), np.float64)
            for block, x in zip(blocks, inputs)]


def attention_rollout(maps, num_prefix, use_class_token=True):
    """Abnar & Zuidema's rollout of per-block attention ``maps`` (each (B, heads, N, N)):
    heads averaged, identity added, rows renormalised, multiplied through the blocks.
    Returns (B, grid, grid) over the patch tokens: the [CLS] row (``use_class_token``) or
    the mean of the patch tokens' rows."""
    import numpy as np

    rollout = None
    for attn in maps:
        a = attn.mean(axis=1)
        a = a + np.eye(a.shape[-1])
        a = a / a.sum(axis=-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout
    if use_class_token:
        relevance = rollout[:, 0, num_prefix:]
    else:
        relevance = rollout[:, num_prefix:, num_prefix:].mean(axis=1)
    grid = math.isqrt(relevance.shape[-1])
    return relevance.reshape(-1, grid, grid)


# -- Grad-CAM ------------------------------------------------------------------------------

def last_stage_output(model):
    """The last layer output that is a spatial map: (B, H, W, C), or (B, N, C) tokens on a
    square grid (PVT's last stage)."""
    for layer in reversed(model.layers):
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4:
            return layer.output
        if len(shape) == 3 and shape[1] and math.isqrt(shape[1]) ** 2 == shape[1]:
            return layer.output
    raise ValueError(f"{model.name} has no spatial feature map to explain")


def grad_cam(model, images):
    """Grad-CAM of the predicted class on the last stage map: (B, h, w) in [0, inf)."""
    import keras
    import numpy as np
    import tensorflow as tf

    features = last_stage_output(model)
    outputs = model.outputs[0]
    probe = keras.Model(model.input, [features, outputs])
    images = tf.convert_to_tensor(images)
    with tf.GradientTape() as tape:
        fmap, logits = probe(images, training=False)
        score = tf.gather(logits, tf.argmax(logits, -1), axis=1, batch_dims=1)
    grads = tape.gradient(score, fmap)
    fmap, grads = np.asarray(fmap, np.float64), np.asarray(grads, np.float64)
    if fmap.ndim == 3:  # tokens on a square grid
        grid = math.isqrt(fmap.shape[1])
        fmap = fmap.reshape(len(fmap), grid, grid, -1)
        grads = grads.reshape(fmap.shape)
    weights = grads.mean(axis=(1, 2), keepdims=True)
    return np.maximum((weights * fmap).sum(-1), 0.0)


# -- images and overlays -------------------------------------------------------------------

def image_files(patterns):
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        for path in matched:
            if not os.path.isfile(path):
                fail(f"--images: {path!r} does not exist")
            files.append(path)
    if not files:
        fail(f"--images {','.join(patterns)!r} matches no file")
    return files


def load_images(prep, seed):
    """(normalised batch, the same images as uint8 for display, names)."""
    import numpy as np
    import tensorflow as tf

    from keras_vit.data import load_dataset, make_pipeline
    from keras_vit.data.folder import decode_image

    img_size = prep["img_size"]
    if F.images:
        files = image_files(F.images)
        raw = [decode_image(tf.io.read_file(f)) for f in files]
        ds = tf.data.Dataset.from_generator(
            lambda: ((r, 0) for r in raw), output_signature=(
                tf.TensorSpec((None, None, 3), tf.uint8), tf.TensorSpec((), tf.int32)))
        names = [os.path.splitext(os.path.basename(f))[0] for f in files]
    else:
        ds, info = load_dataset("shapes", "validation", img_size=img_size, seed=seed,
                                num_samples=F.num_images)
        names = [f"shapes_{i}_{info.class_names[int(y)]}" for i, (_, y) in enumerate(ds)]
    pipe = make_pipeline(ds, training=False, img_size=img_size, batch_size=len(names),
                         num_classes=1, mean=prep["mean"], std=prep["std"],
                         crop_pct=prep["crop_pct"], interpolation=prep["interpolation"])
    batch = np.asarray(next(iter(pipe))[0])
    mean = np.asarray(prep["mean"]) * 255.0
    std = np.asarray(prep["std"]) * 255.0
    shown = np.clip(batch * std + mean, 0, 255).astype(np.uint8)
    return batch, shown, names


def upsample(heatmap, size):
    """A (h, w) map resized to (size, size) and scaled to [0, 1]."""
    import numpy as np
    import tensorflow as tf

    resized = tf.image.resize(np.asarray(heatmap, np.float32)[..., None], (size, size),
                              method="bilinear")[..., 0].numpy()
    low, high = resized.min(), resized.max()
    return (resized - low) / (high - low) if high > low else np.zeros_like(resized)


def save_overlay(image, heatmap, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 3.5))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(image)
    axes[1].imshow(upsample(heatmap, image.shape[0]), cmap="jet", alpha=0.5)
    axes[1].set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def preprocessing(model):
    from keras_vit.registry import get_model_config, list_models

    prep = read_preprocessing(F.model_path)
    if prep:
        return prep
    cfg = get_model_config(model.name) if model.name in list_models() else {}
    return dict(img_size=model.input_shape[1], mean=cfg.get("mean", (0.485, 0.456, 0.406)),
                std=cfg.get("std", (0.229, 0.224, 0.225)), crop_pct=cfg.get("crop_pct", 0.875),
                interpolation=cfg.get("interpolation", "bicubic"), class_names=None)


def main(argv):
    del argv
    import numpy as np

    model = load_model(F.model_path)
    prep = preprocessing(model)
    seed = F.seed if F.seed is not None else run_data_settings(F.model_path).get("seed", 0)
    batch, shown, names = load_images(prep, seed)
    blocks = global_attention_blocks(model)
    method = F.method if F.method != "auto" else ("rollout" if blocks else "gradcam")
    if method == "rollout" and not blocks:
        fail(f"--method=rollout: {model.name} has no global self-attention blocks; use "
             "--method=gradcam")
    if method == "rollout":
        maps = attention_maps(model, blocks, batch)
        num_prefix, use_class_token = prefix_tokens(model, maps[0].shape[-1])
        heatmaps = attention_rollout(maps, num_prefix, use_class_token)
        label = f"attention rollout ({len(blocks)} blocks)"
    else:
        heatmaps = grad_cam(model, batch)
        label = "Grad-CAM, last stage"
    logits = np.asarray(model(batch, training=False))
    logits = logits if logits.ndim == 2 else logits.reshape(len(batch), -1)
    classes = prep.get("class_names")
    out = F.output_dir or (os.path.join(model_dir_of(F.model_path), "visualize")
                           if os.path.exists(F.model_path) else "visualize")
    os.makedirs(out, exist_ok=True)
    for image, heatmap, name, row in zip(shown, heatmaps, names, logits):
        top = int(row.argmax())
        predicted = classes[top] if classes and top < len(classes) else str(top)
        path = os.path.join(out, f"{name}_{method}.png")
        save_overlay(image, heatmap, f"{label}\npredicted: {predicted}", path)
        print(path)
    print(f"{len(names)} {method} overlays in {out}")


if __name__ == "__main__":
    app.run(main)
