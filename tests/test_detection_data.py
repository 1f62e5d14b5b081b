"""Detection data and evaluation: shapes and COCO-format input padded to a fixed box count,
augmentation that moves boxes with their pixels, post-processing, COCO mAP."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from keras_vit.detection.data import load_detection_dataset, make_detection_pipeline, read_coco
from keras_vit.detection.metrics import CocoEvaluator
from keras_vit.detection.postprocess import postprocess


def test_shapes_boxes_enclose_their_shapes():
    ds, info = load_detection_dataset("shapes", "train", img_size=48, num_samples=6, max_boxes=4)
    assert info.num_classes == 8
    for image, boxes, classes in ds:
        boxes, classes = boxes.numpy(), classes.numpy()
        n = int((classes >= 0).sum())
        assert 1 <= n <= 3 and (classes[n:] == -1).all() and (boxes[n:] == 0).all()
        assert ((boxes[:n, 2:] > boxes[:n, :2]).all() and (boxes[:n] >= 0).all()
                and (boxes[:n] <= 48).all())


def _colour_boxes(rng, count=6, size=(40, 60)):
    """Images of filled rectangles, each in a colour that encodes its index (30 * (i + 1))."""
    import tensorflow as tf

    images, all_boxes, all_classes = [], [], []
    for _ in range(count):
        image = np.zeros(size + (3,), np.uint8)
        boxes = np.zeros((3, 4), np.float32)
        for i in range(3):
            x0, y0 = rng.integers(0, size[1] - 14), rng.integers(0, size[0] - 14)
            w, h = rng.integers(8, 14, 2)
            boxes[i] = [x0, y0, x0 + w, y0 + h]
        for i in range(3):  # later boxes on top: only the last one is checked whole
            x0, y0, x1, y1 = boxes[i].astype(int)
            image[y0:y1, x0:x1] = 30 * (i + 1)
        images.append(image)
        all_boxes.append(boxes)
        all_classes.append(np.array([0, 1, 2], np.int32))
    return tf.data.Dataset.from_tensor_slices((np.stack(images), np.stack(all_boxes),
                                               np.stack(all_classes)))


def test_augmentation_moves_boxes_with_their_pixels():
    """Flip, crop and letterbox: each box still covers pixels of its own colour, and a box
    the crop cut away entirely becomes padding."""
    ds = _colour_boxes(np.random.default_rng(0))
    pipe = make_detection_pipeline(ds, training=True, img_size=64, batch_size=6, mean=(0, 0, 0),
                                   std=(1 / 255,) * 3, seed=3)
    images, targets = next(iter(pipe))
    images, classes, boxes = images.numpy(), targets["classes"].numpy(), targets["boxes"].numpy()
    assert images.shape == (6, 64, 64, 3) and boxes.shape == (6, 3, 4)
    checked = 0
    for image, image_classes, image_boxes in zip(images, classes, boxes):
        cls = 2  # the top rectangle: never covered
        if image_classes[cls] < 0:
            continue
        cx, cy, w, h = image_boxes[cls] * 64
        # 2 px inside the box: the bilinear resize blends the edges' pixels with neighbours
        inner = image[int(cy - h / 2) + 2:int(cy + h / 2) - 2,
                      int(cx - w / 2) + 2:int(cx + w / 2) - 2, 0]
        if inner.size:
            assert np.abs(inner - 90).max() < 2, inner
            checked += 1
    assert checked >= 3
    again = next(iter(make_detection_pipeline(ds, training=True, img_size=64, batch_size=6,
                                              mean=(0, 0, 0), std=(1 / 255,) * 3, seed=3)))
    np.testing.assert_array_equal(again[1]["boxes"].numpy(), boxes)


def test_eval_letterbox_keeps_boxes_exact():
    ds = _colour_boxes(np.random.default_rng(1), count=2)
    pipe = make_detection_pipeline(ds, training=False, img_size=30, batch_size=2)
    _, targets = next(iter(pipe))
    raw = next(iter(ds.batch(2)))[1].numpy()
    scale = 30 / 60  # the longer side (60) becomes 30
    x0, y0, x1, y1 = np.moveaxis(raw * scale / 30, -1, 0)
    expected = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
    np.testing.assert_allclose(targets["boxes"].numpy(), expected, atol=1e-6)


def test_coco_json_is_read_as_detr_does(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images / name)
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 20},
                       {"id": 2, "file_name": "b.png", "width": 30, "height": 20}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 5], "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 1, "bbox": [25, 15, 10, 10]},  # clipped
                {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 4]},   # no area
                {"id": 4, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1}]}
    path = tmp_path / "annotations" / "instances_train.json"
    path.parent.mkdir()
    path.write_text(json.dumps(coco))
    files, boxes, classes, names = read_coco(str(path), max_boxes=4)
    assert [os.path.basename(f) for f in files] == ["a.png", "b.png"]
    np.testing.assert_array_equal(classes, [[3, 1, -1, -1], [-1, -1, -1, -1]])
    np.testing.assert_allclose(boxes[0, :2], [[2, 3, 12, 8], [25, 15, 30, 20]])
    ds, info = load_detection_dataset(f"coco:{path}", "train", max_boxes=4)
    assert info.num_classes == 4 and info.class_names[3] == "dog"
    image, _, _ = next(iter(ds))
    assert image.shape == (20, 30, 3)
    with pytest.raises(ValueError, match="5 boxes, more than max_boxes=4"):
        coco["annotations"] = [dict(coco["annotations"][0], id=i) for i in range(5)]
        path.write_text(json.dumps(coco))
        read_coco(str(path), max_boxes=4)


def test_postprocess_softmax_and_sigmoid():
    logits = np.array([[[2.0, 0.0, 5.0], [0.0, 3.0, 0.0]]], np.float32)  # 2 classes + no-object
    boxes = np.array([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5]]], np.float32)
    out = postprocess({"logits": logits, "pred_boxes": boxes}, (10, 20), top_k=2)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out["scores"])[0], [p[1, 1], p[0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["classes"])[0], [1, 0])
    np.testing.assert_allclose(np.asarray(out["boxes"])[0],
                               [[0, 0, 10, 5], [8, 3, 12, 7]], atol=1e-5)
    sig = postprocess({"logits": logits, "pred_boxes": boxes}, (10, 20), top_k=3, sigmoid=True)
    np.testing.assert_array_equal(np.asarray(sig["classes"])[0], [2, 1, 0])  # 5, 3, 2
    np.testing.assert_allclose(np.asarray(sig["boxes"])[0, 1], [0, 0, 10, 5], atol=1e-5)


def test_coco_map_of_perfect_partial_and_wrong_detections():
    gt = np.array([[0, 0, 40, 40], [50, 50, 90, 90], [0, 0, 0, 0]], np.float32)
    gt_classes = np.array([0, 1, -1])
    perfect = CocoEvaluator(2)
    perfect.add(gt, gt_classes, gt[:2], [0.9, 0.8], [0, 1], (100, 100))
    assert perfect.result()["AP"] == pytest.approx(1.0)
    # One box exact, one shifted to IoU 0.6 (AP50 counts it, AP75 does not), wrong class: 0.
    shifted = np.array([[50, 50, 90, 90]], np.float32) + np.array([10, 0, 10, 0])  # IoU 30/50
    partial = CocoEvaluator(2)
    partial.add(gt, gt_classes, np.concatenate([gt[:1], shifted]), [0.9, 0.8], [0, 1], (100, 100))
    result = partial.result()
    assert result["AP50"] == pytest.approx(1.0) and result["AP75"] == pytest.approx(0.5)
    wrong = CocoEvaluator(2)
    wrong.add(gt, gt_classes, gt[:2], [0.9, 0.8], [1, 0], (100, 100))
    assert wrong.result()["AP"] == pytest.approx(0.0)
