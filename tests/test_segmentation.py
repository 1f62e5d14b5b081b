"""What every segmentation model shares: mIoU from a confusion matrix, the per-pixel loss,
predict_masks, the shapes and folder data with their aligned augmentation, poly schedule."""

import os

import keras
import numpy as np
import pytest
from PIL import Image

from keras_vit.segmentation import (
    ConfusionMatrix,
    SegmentationCrossEntropy,
    predict_masks,
    resize_logits,
    segmentation_metrics,
)
from keras_vit.segmentation.data import (
    load_segmentation_dataset,
    make_segmentation_pipeline,
    read_mask,
    reduce_labels,
)


# --- metrics ----------------------------------------------------------------------------

def test_confusion_matrix_metrics_by_hand():
    """Labels [0 0 1 1 2 | 255] vs predictions [0 1 1 1 0 | 2], 4 classes.
    IoU: class 0 = 1 / (2 + 2 - 1) = 1/3; class 1 = 2 / (2 + 3 - 2) = 2/3; class 2 = 0 / 1 = 0;
    class 3: absent from both -> NaN, out of the mean. Pixel accuracy 3/5."""
    labels = np.array([[0, 0, 1, 1, 2, 255]])
    predictions = np.array([[0, 1, 1, 1, 0, 2]])
    result = ConfusionMatrix(4).update(labels, predictions).result()
    assert result["per_class_iou"][:3] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert result["per_class_iou"][3] is None
    assert result["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert result["pixel_accuracy"] == pytest.approx(3 / 5)
    assert result["per_class_accuracy"][:3] == pytest.approx([0.5, 1.0, 0.0])


def test_confusion_matrix_accumulates_over_batches():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (6, 8, 8))
    predictions = rng.integers(0, 5, (6, 8, 8))
    whole = ConfusionMatrix(5).update(labels, predictions).matrix
    batched = ConfusionMatrix(5)
    for i in range(0, 6, 2):
        batched.update(labels[i:i + 2], predictions[i:i + 2])
    np.testing.assert_array_equal(batched.matrix, whole)
    assert whole.sum() == labels.size
    assert segmentation_metrics(np.eye(3) * 4)["mIoU"] == 1.0


def test_confusion_matrix_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="label 7 is outside the 3 classes"):
        ConfusionMatrix(3).update([[0, 7]], [[0, 1]])


# --- loss and predictions --------------------------------------------------------------

def _bilinear_half_pixel(x, out_h, out_w):
    """torch's F.interpolate(mode="bilinear", align_corners=False) on NHWC, written out."""
    n, h, w, c = x.shape

    def axis(out, size):
        src = np.clip((np.arange(out) + 0.5) * size / out - 0.5, 0, None)
        lo = np.minimum(np.floor(src).astype(int), size - 1)
        hi = np.minimum(lo + 1, size - 1)
        return lo, hi, src - lo

    y0, y1, wy = axis(out_h, h)
    x0, x1, wx = axis(out_w, w)
    top = x[:, y0][:, :, x0] * (1 - wx)[None, None, :, None] + x[:, y0][:, :, x1] * wx[
        None, None, :, None]
    bottom = x[:, y1][:, :, x0] * (1 - wx)[None, None, :, None] + x[:, y1][:, :, x1] * wx[
        None, None, :, None]
    return top * (1 - wy)[None, :, None, None] + bottom * wy[None, :, None, None]


def test_resize_logits_is_torch_bilinear_without_align_corners():
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 3)).astype(np.float32)
    ours = keras.ops.convert_to_numpy(resize_logits(x, (16, 24)))
    np.testing.assert_allclose(ours, _bilinear_half_pixel(x, 16, 24), atol=1e-5)


def test_cross_entropy_resizes_and_ignores_like_a_direct_computation():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 8, 8))
    labels[0, :2] = 255
    labels[1] = 255  # an image with nothing labelled counts 0, not NaN
    up = _bilinear_half_pixel(logits, 8, 8)
    log_p = up - np.log(np.exp(up).sum(-1, keepdims=True))
    expected = []
    for i in range(2):
        keep = labels[i] != 255
        picked = np.take_along_axis(log_p[i], np.where(keep, labels[i], 0)[..., None], -1)[..., 0]
        expected.append(-(picked * keep).sum() / max(keep.sum(), 1))
    loss = float(SegmentationCrossEntropy()(labels, logits))
    assert loss == pytest.approx(np.mean(expected), rel=1e-5)


def test_predict_masks_upsamples_then_takes_the_argmax():
    inputs = keras.Input((8, 8, 3))
    # logits at 1/4 resolution: a 2x2 average pool of the input's 3 channels, twice
    pooled = keras.layers.AveragePooling2D(4)(inputs)
    model = keras.Model(inputs, pooled)
    images = np.random.default_rng(2).standard_normal((3, 8, 8, 3)).astype(np.float32)
    masks = keras.ops.convert_to_numpy(predict_masks(model, images))
    assert masks.shape == (3, 8, 8) and masks.dtype == np.int32
    expected = _bilinear_half_pixel(keras.ops.convert_to_numpy(model(images)), 8, 8).argmax(-1)
    np.testing.assert_array_equal(masks, expected)


# --- data -------------------------------------------------------------------------------

def test_shapes_segmentation_masks_mark_the_shapes():
    ds, info = load_segmentation_dataset("shapes", "train", img_size=32, num_samples=8)
    assert info.num_classes == 9 and info.class_names[0] == "background"
    for image, mask in ds:
        mask = mask.numpy()
        assert mask.shape == (32, 32) and 0 < (mask > 0).sum() < mask.size
        assert mask.max() <= 8


def _colour_coded(num, size, rng):
    """Images whose red channel encodes the mask (40 * class id), masks of blocks."""
    masks = np.kron(rng.integers(0, 5, (num, 4, 4)), np.ones((size // 4, size // 4)))
    images = np.repeat((masks * 40)[..., None], 3, -1)
    return images.astype(np.uint8), masks.astype(np.uint8)


def test_training_augmentation_keeps_masks_on_their_pixels():
    """Random scale, pad, crop and flip move image and mask together: wherever a pixel is
    labelled, its colour says the same class (away from resampled block edges)."""
    import tensorflow as tf

    images, masks = _colour_coded(8, 48, np.random.default_rng(3))
    ds = tf.data.Dataset.from_tensor_slices((images, masks))
    pipe = make_segmentation_pipeline(ds, training=True, img_size=32, batch_size=8, mean=(0, 0, 0),
                                      std=(1 / 255,) * 3, seed=1)
    x, y = next(iter(pipe))
    x, y = x.numpy()[..., 0], y.numpy()
    assert x.shape == (8, 32, 32) and y.dtype == np.int32
    labelled = y != 255
    from_colour = np.rint(x / 40)
    assert labelled.mean() > 0.5
    assert (from_colour[labelled] == y[labelled]).mean() > 0.9
    # and the same seed gives the same batch
    x2, y2 = next(iter(make_segmentation_pipeline(ds, training=True, img_size=32, batch_size=8,
                                                  mean=(0, 0, 0), std=(1 / 255,) * 3, seed=1)))
    np.testing.assert_array_equal(y2.numpy(), y)


def _write_pair(root, split, name, image, mask, palette=False):
    os.makedirs(os.path.join(root, "images", split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
    Image.fromarray(image).save(os.path.join(root, "images", split, name + ".png"))
    mask_image = Image.fromarray(mask, mode="L")
    if palette:
        mask_image = mask_image.convert("P")
        mask_image.putpalette([v for i in range(256) for v in ((i * 37) % 256, i, 255 - i)])
    mask_image.save(os.path.join(root, "annotations", split, name + ".png"))


def test_folder_reads_index_and_palette_masks_and_checks_each_pair(tmp_path):
    root = str(tmp_path)
    rng = np.random.default_rng(4)
    images, masks = _colour_coded(3, 16, rng)
    _write_pair(root, "training", "a", images[0], masks[0])
    _write_pair(root, "training", "b", images[1], masks[1], palette=True)
    _write_pair(root, "training", "small", images[2], masks[2][:8])  # mask of another size
    _write_pair(root, "training", "bad", images[2], np.full((16, 16), 9, np.uint8))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(f"c{i}" for i in range(5)))
    np.testing.assert_array_equal(read_mask(os.path.join(root, "annotations", "training",
                                                         "b.png")), masks[1])
    with pytest.raises(ValueError, match="bad.png: label 9 is outside the 5 classes"):
        load_segmentation_dataset(f"folder:{root}", "train", strict=True)
    ds, info = load_segmentation_dataset(f"folder:{root}", "train")
    assert info.num_classes == 5 and info.num_examples == 2 and info.skipped == 2
    assert any("small.png: mask is 16x8" in s for s in info.skipped_files)
    got = [m.numpy() for _, m in ds]
    np.testing.assert_array_equal(got[0], masks[0])
    np.testing.assert_array_equal(got[1], masks[1])
    with pytest.raises(ValueError, match="no 'validation' split"):
        load_segmentation_dataset(f"folder:{root}", "validation")


def test_reduce_zero_label_is_ade20k_convention():
    np.testing.assert_array_equal(reduce_labels(np.array([0, 1, 2, 150, 255], np.uint8)),
                                  [255, 0, 1, 149, 255])


def test_poly_schedule_decays_linearly_to_zero():
    from keras_vit.training.schedules import WarmupSchedule

    schedule = WarmupSchedule(1e-3, total_steps=100, warmup_steps=10, schedule="poly")
    lrs = [float(schedule(s)) for s in (0, 9, 10, 55, 100)]
    assert lrs == pytest.approx([1e-4, 1e-3, 1e-3, 0.5e-3, 0.0], abs=1e-9)
