import os

import numpy as np
import pytest
from PIL import Image

from keras_vit.data import load_dataset, make_pipeline, shapes, write_tfrecord


def test_shapes_are_deterministic_and_splits_disjoint():
    a = shapes.generate(40, 32, seed=3, split="train")
    b = shapes.generate(40, 32, seed=3, split="train")
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    val = shapes.generate(40, 32, seed=3, split="validation")
    train_set = {img.tobytes() for img in a["images"]}
    assert not any(img.tobytes() in train_set for img in val["images"])
    other = shapes.generate(40, 32, seed=4, split="train")
    assert not np.array_equal(other["images"], a["images"])


def test_shapes_classes_balanced_any_size():
    d = shapes.generate(80, 48, seed=0)
    assert d["images"].shape == (80, 48, 48, 3) and d["images"].dtype == np.uint8
    assert np.bincount(d["labels"], minlength=8).tolist() == [10] * 8
    assert shapes.generate(2, 100, seed=0)["images"].shape == (2, 100, 100, 3)
    with pytest.raises(ValueError, match="img_size >= 16"):
        shapes.generate(1, 8)


def test_shapes_boxes_and_masks_agree():
    d = shapes.generate(20, 64, seed=1, min_shapes=2, max_shapes=4)
    for boxes, classes, masks, sem, label in zip(d["boxes"], d["classes"], d["instance_masks"],
                                                 d["semantic_masks"], d["labels"]):
        assert 2 <= len(boxes) <= 4 and len(classes) == len(boxes) == len(masks)
        assert classes[0] == label
        for (x0, y0, x1, y1), mask, cls in zip(boxes, masks, classes):
            ys, xs = np.nonzero(mask)
            if len(xs):  # visible part inside the shape's box
                assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
                assert np.all(sem[mask] == cls + 1)
        assert np.all((sem > 0) == np.any(masks, axis=0))


def _make_folder(root, corrupt=True):
    rng = np.random.default_rng(0)
    for cls, ext in (("cat", "png"), ("dog", "jpg"), ("emu", "bmp")):
        os.makedirs(os.path.join(root, cls))
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(
                os.path.join(root, cls, f"{i}.{ext}"))
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
        os.path.join(root, "emu", "anim.gif"))
    if corrupt:
        with open(os.path.join(root, "dog", "broken.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff not a jpeg")


def test_folder_skips_and_reports_corrupt_files(tmp_path):
    root = str(tmp_path / "imgs")
    _make_folder(root)
    ds, info = load_dataset(f"folder:{root}", img_size=32)
    assert info.class_names == ["cat", "dog", "emu"]
    assert info.num_examples == 10 and info.skipped == 1
    assert info.skipped_files[0].endswith("broken.jpg")
    items = list(ds.as_numpy_iterator())
    assert len(items) == 10 and all(x.shape[-1] == 3 for x, _ in items)
    with pytest.raises(ValueError, match="broken.jpg"):
        load_dataset(f"folder:{root}", img_size=32, strict=True)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(f"folder:{tmp_path}/nope")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no class subfolders"):
        load_dataset(f"folder:{tmp_path}/empty")
    os.makedirs(tmp_path / "one" / "a")
    with pytest.raises(ValueError, match="class 'a'.*no readable images"):
        load_dataset(f"folder:{tmp_path}/one")
    with pytest.raises(ValueError, match="must be shapes"):
        load_dataset("imagenet")


def test_tfrecord_round_trip(tmp_path):
    root = str(tmp_path / "imgs")
    _make_folder(root, corrupt=False)
    info = write_tfrecord(root, str(tmp_path / "rec" / "train.tfrecord"), shards=2)
    ds, rinfo = load_dataset(f"tfrecord:{tmp_path}/rec/train.tfrecord-*")
    assert rinfo.class_names == info.class_names and rinfo.num_examples == 10
    folder_ds, _ = load_dataset(f"folder:{root}")
    a = sorted((x.tobytes(), int(y)) for x, y in ds.as_numpy_iterator())
    b = sorted((x.tobytes(), int(y)) for x, y in folder_ds.as_numpy_iterator())
    assert a == b  # identical pixels (PNG/BMP/GIF lossless, JPEG bytes re-decoded) and labels


def test_tfds_missing_is_explained():
    with pytest.raises(ValueError, match="tfds"):
        load_dataset("tfds:imagenet2012", data_dir="/nonexistent")


def test_eval_pipeline_normalises_exactly():
    import tensorflow as tf

    images = np.full((3, 40, 40, 3), 128, np.uint8)
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(3, dtype=np.int32)))
    x, y = next(iter(make_pipeline(ds, training=False, img_size=32, batch_size=3, num_classes=4,
                                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))))
    assert x.shape == (3, 32, 32, 3) and y.dtype == tf.int32
    expected = (128 - 127.5) / (255 * np.array([0.25, 0.5, 1.0]))
    np.testing.assert_allclose(np.asarray(x)[0, 5, 5], expected, atol=1e-4)


def test_train_pipeline_soft_labels_and_replay():
    ds, info = load_dataset("shapes", img_size=32, num_samples=64)
    pipe = make_pipeline(ds, training=True, img_size=32, batch_size=16, num_classes=8,
                         mixup=0.8, cutmix=1.0, seed=1, repeat=True)
    x, y = next(iter(pipe))
    assert x.shape == (16, 32, 32, 3) and y.shape == (16, 8)
    np.testing.assert_allclose(np.asarray(y).sum(-1), 1.0, atol=1e-5)
    assert (np.asarray(y).max(-1) < 0.999).any()  # some labels really are mixed

    def plain():  # a fresh pipeline, as a restarted process builds it
        return make_pipeline(ds, training=True, img_size=32, batch_size=16, num_classes=8, seed=1,
                             repeat=True)

    batches = [np.asarray(b[0]) for b in plain().take(6)]
    replay = [np.asarray(b[0]) for b in plain().skip(4).take(2)]
    np.testing.assert_array_equal(batches[4], replay[0])  # what resume relies on
    np.testing.assert_array_equal(batches[5], replay[1])


def test_randaugment_pipeline_runs_and_changes_images():
    ds, _ = load_dataset("shapes", img_size=32, num_samples=32)
    kw = dict(training=True, img_size=32, batch_size=8, num_classes=8, seed=0)
    plain = np.asarray(next(iter(make_pipeline(ds, **kw)))[0])
    augmented = np.asarray(next(iter(make_pipeline(ds, randaugment=True, **kw)))[0])
    assert augmented.shape == (8, 32, 32, 3) and np.isfinite(augmented).all()
    assert np.abs(augmented - plain).max() > 0.1
