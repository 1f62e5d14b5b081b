"""TFRecord shards of the three tasks (tools/make_tfrecords.py): what they read back equals
what the folder / COCO readers give for the same data, element for element; counts and class
names come from the index."""

import json
import glob
import os

import numpy as np
import pytest
from PIL import Image

import app_process
from keras_vit.data import load_dataset
from keras_vit.detection.data import load_detection_dataset, write_detection_tfrecord
from keras_vit.segmentation.data import load_segmentation_dataset, write_segmentation_tfrecord

TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "make_tfrecords.py")


def _elements(ds):
    """Every element as bytes and shapes, sorted: the set of examples whatever the order."""
    return sorted(tuple((a.tobytes(), a.shape, a.dtype.str) for a in item)
                  for item in ds.as_numpy_iterator())


def _index(prefix):
    with open(prefix + ".index.json") as f:
        return json.load(f)


def _run_tool(*args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    return app_process.run_app(TOOL, *args, env=env, timeout=300)


def test_classification_tool_writes_shards_and_index(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for name, ext in (("cat", "png"), ("dog", "jpg")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12 + i, 10, 3), dtype=np.uint8)).save(
                root / name / f"{i}.{ext}")
    prefix = str(tmp_path / "rec" / "train")
    run = _run_tool("--task=classification", f"--input={root}", f"--output={prefix}",
                    "--shards=2")
    assert run.returncode == 0, run.stderr[-3000:]
    shards = [f"{prefix}-00000-of-00002", f"{prefix}-00001-of-00002"]
    assert sorted(os.listdir(tmp_path / "rec")) == sorted(
        os.path.basename(p) for p in shards + [prefix + ".index.json"])
    index = _index(prefix)
    assert index["shards"] == {"train-00000-of-00002": 3, "train-00001-of-00002": 3}
    assert index["class_names"] == ["cat", "dog"] and index["task"] == "classification"
    assert f"{shards[0]}: 3 records" in run.stdout
    assert f"--dataset=tfrecord:'{prefix}-?????-of-00002'" in run.stdout
    ds, info = load_dataset(f"tfrecord:{prefix}-?????-of-00002")
    folder_ds, folder_info = load_dataset(f"folder:{root}")
    assert info.class_names == folder_info.class_names and info.num_examples == 6
    assert _elements(ds) == _elements(folder_ds)


def test_tool_refuses_missing_input_before_writing(tmp_path):
    run = _run_tool("--task=segmentation", f"--input={tmp_path}/nope",
                    f"--output={tmp_path}/out/train", "--shards=2")
    assert run.returncode != 0
    assert f"--input '{tmp_path}/nope': no such folder" in run.stderr
    assert os.listdir(tmp_path) == []


def _write_pair(root, name, image, mask, palette=False, ext="png"):
    for kind in ("images", "annotations"):
        os.makedirs(os.path.join(root, kind, "training"), exist_ok=True)
    Image.fromarray(image).save(os.path.join(root, "images", "training", f"{name}.{ext}"))
    mask_image = Image.fromarray(mask)
    if palette:  # colours unrelated to the ids: the ids are the palette indices
        mask_image = mask_image.convert("P")
        mask_image.putpalette([v for i in range(256) for v in ((i * 37) % 256, i, 255 - i)])
    mask_image.save(os.path.join(root, "annotations", "training", f"{name}.png"))


def test_segmentation_records_equal_the_folder(tmp_path):
    import tensorflow as tf

    root = str(tmp_path / "ade")
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 255, (9 + i, 11, 3), dtype=np.uint8) for i in range(3)]
    ids = [rng.choice(np.array(choice, np.uint8), (9 + i, 11))
           for i, choice in enumerate(([0, 1, 2, 255], [0, 1, 2, 3, 4], [1, 3]))]
    _write_pair(root, "a", pixels[0], ids[0])
    _write_pair(root, "b", pixels[1], ids[1], palette=True)  # label 4: only with reduction
    _write_pair(root, "c", pixels[2], ids[2], ext="jpg")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("wall\nsky\nfloor\ntree\n")
    for reduce, kept in ((True, 3), (False, 2)):  # raw id 4 is outside the 4 classes
        prefix = str(tmp_path / f"rec_{reduce}" / "train")
        written = write_segmentation_tfrecord(root, prefix, split="train", shards=2,
                                              reduce_zero_label=reduce)
        assert [count for _, count in written] == [kept - kept // 2, kept // 2]
        assert _index(prefix)["reduce_zero_label"] is reduce
        load = dict(reduce_zero_label=reduce)
        ds, info = load_segmentation_dataset(f"tfrecord:{prefix}-*", "train", **load)
        folder_ds, folder_info = load_segmentation_dataset(f"folder:{root}", "train", **load)
        assert info.class_names == folder_info.class_names == ["wall", "sky", "floor", "tree"]
        assert info.num_classes == 4 and info.num_examples == folder_info.num_examples == kept
        assert _elements(ds) == _elements(folder_ds)
    with pytest.raises(ValueError, match="written for reduce_zero_label=True"):
        load_segmentation_dataset(f"tfrecord:{tmp_path}/rec_True/train-*", "train")
    # records stored raw: the palette mask's ids, as read_mask gives them
    spec = {"image/segmentation/class/encoded": tf.io.FixedLenFeature([], tf.string)}
    masks = [tf.io.decode_png(tf.io.parse_single_example(raw, spec)[
        "image/segmentation/class/encoded"], channels=1).numpy()[..., 0]
        for raw in tf.data.TFRecordDataset(sorted(glob.glob(f"{tmp_path}/rec_True/train-*")))]
    palette = [m for m in masks if m.shape == ids[1].shape]  # b's, in the writer's order
    assert len(masks) == 3 and len(palette) == 1
    np.testing.assert_array_equal(palette[0], ids[1])
    # no index: one counting pass gives the same count, classes named by their ids
    os.remove(f"{tmp_path}/rec_False/train.index.json")
    ds, info = load_segmentation_dataset(f"tfrecord:{tmp_path}/rec_False/train-*", "train",
                                         num_samples=1)
    assert info.num_examples == 1 and info.class_names == ["0", "1", "2", "3"]
    assert len(list(ds)) == 1


def test_detection_records_equal_the_coco_reader(tmp_path):
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(2)
    for name in ("a.png", "b.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
            tmp_path / "images" / name)
    ann = [(1, 3, [2.5, 3, 10, 5.25], 0), (1, 1, [25, 15, 10, 10], 0),  # clipped
           (1, 1, [5, 5, 0, 4], 0),  # no area: dropped
           (1, 3, [0, 0, 4, 4], 0), (2, 1, [1, 1, 5, 5], 1),  # crowd: left out
           (3, 7, [1.1, 2.2, 3.3, 4.4], 0)]
    coco = {"images": [{"id": i + 1, "file_name": name, "width": 30, "height": 20}
                       for i, name in enumerate(("a.png", "b.jpg", "c.png"))],
            "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"},
                           {"id": 7, "name": "emu"}],
            "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": b, "iscrowd": z}
                            for k, (i, c, b, z) in enumerate(ann)]}
    path = tmp_path / "annotations" / "instances_train.json"
    path.parent.mkdir()
    path.write_text(json.dumps(coco))
    prefix = str(tmp_path / "rec" / "train")
    written = write_detection_tfrecord(str(path), prefix, shards=2)
    assert [count for _, count in written] == [2, 1]
    index = _index(prefix)
    assert index["task"] == "detection" and index["max_boxes_per_image"] == 3
    ds, info = load_detection_dataset(f"tfrecord:{prefix}-*", max_boxes=5)
    coco_ds, coco_info = load_detection_dataset(f"coco:{path}", max_boxes=5)
    assert info.num_classes == coco_info.num_classes == 8  # the largest id + 1
    assert info.class_names == coco_info.class_names and info.class_names[7] == "emu"
    assert info.num_examples == 3
    assert _elements(ds) == _elements(coco_ds)
    with pytest.raises(ValueError, match="3 boxes, more than max_boxes=2"):
        load_detection_dataset(f"tfrecord:{prefix}-*", max_boxes=2)
    with pytest.raises(ValueError, match="hold detection records"):
        load_segmentation_dataset(f"tfrecord:{prefix}-*")
    _, taken = load_detection_dataset(f"tfrecord:{prefix}-*", num_samples=2)
    assert taken.num_examples == 2
    os.remove(prefix + ".index.json")  # no index: one counting pass
    ds, info = load_detection_dataset(f"tfrecord:{prefix}-*", max_boxes=5)
    assert info.num_classes == 8 and info.num_examples == 3
    assert _elements(ds) == _elements(coco_ds)
