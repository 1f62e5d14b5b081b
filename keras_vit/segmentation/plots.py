"""Pictures of segmentation results: image / ground truth / prediction side by side."""

import numpy as np

from keras_vit.segmentation.losses import IGNORE_INDEX


def class_colours(num_classes, seed=0):
    """A fixed colour per class (class 0 dark grey, the rest distinct random hues)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 256, (max(num_classes, 1), 3)).astype(np.uint8)
    colours[0] = (48, 48, 48)
    return colours


def overlay(image, mask, colours, alpha=0.5):
    """``image`` uint8 (H, W, 3) with ``mask``'s class colours blended in; ignored pixels
    (255) stay as they are."""
    image = image.astype(np.float32)
    labelled = mask != IGNORE_INDEX
    coloured = colours[np.where(labelled, mask, 0) % len(colours)].astype(np.float32)
    blended = np.where(labelled[..., None], (1 - alpha) * image + alpha * coloured, image)
    return np.clip(blended, 0, 255).astype(np.uint8)


def plot_segmentation_samples(images, masks, predictions, path, class_names):
    """One row per sample: the image, the ground truth and the prediction overlaid; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = class_colours(len(class_names))
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for row, (image, mask, predicted) in enumerate(zip(images, masks, predictions)):
        for col, (title, shown) in enumerate((("image", image),
                                              ("ground truth", overlay(image, mask, colours)),
                                              ("prediction", overlay(image, predicted, colours)))):
            axes[row, col].imshow(shown)
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(title)
    handles = [matplotlib.patches.Patch(color=colours[i] / 255, label=name)
               for i, name in enumerate(class_names[:20])]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
