"""Detection data: the embedded shapes in detection mode and COCO-format datasets, padded to a
fixed number of boxes per image, with augmentation that moves the boxes with the pixels.

Unbatched elements are (image uint8 (H, W, 3), boxes float32 (M, 4) pixel xyxy, classes
int32 (M,), -1 for padding). The pipelines turn them into batches of
``(images (B, S, S, 3) normalised, {"classes": (B, M), "boxes": (B, M, 4)})``, boxes
normalised (cx, cy, w, h) to the S x S canvas, which is what ``SetCriterion`` takes.

COCO layout (``coco:ANNOTATIONS.json``): images are found at ``file_name`` relative to the
json's folder, or to ``<json folder>/../images/<split>`` / ``<json folder>/images``. As the
DETR references do, the class index is the COCO ``category_id`` (COCO's 91 ids, of which 80
are used), crowd annotations are left out, and boxes are clipped to the image; a box left
with no area is dropped. ``tfrecord:GLOB`` reads the shards ``write_detection_tfrecord``
(tools/make_tfrecords.py) writes from such a json: the same images, boxes and classes.
"""

import json
import os

import numpy as np

from keras_vit.data import DatasetInfo, Examples, shapes, training_elements

DEFAULT_MAX_BOXES = 16
DEFAULT_SHAPES_SAMPLES = {"train": 2000, "validation": 500, "test": 500}


def pad_boxes(boxes, classes, max_boxes, source=""):
    """(max_boxes, 4) float32 and (max_boxes,) int32 (-1 pads); more boxes is an error."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(boxes) > max_boxes:
        raise ValueError(f"{source}: {len(boxes)} boxes, more than max_boxes={max_boxes}")
    padded = np.zeros((max_boxes, 4), np.float32)
    padded_classes = np.full((max_boxes,), -1, np.int32)
    padded[:len(boxes)] = boxes
    padded_classes[:len(boxes)] = np.asarray(classes, np.int32)
    return padded, padded_classes


def read_coco(path, max_boxes=DEFAULT_MAX_BOXES):
    """(image files, padded boxes (N, M, 4) xyxy pixels, padded classes (N, M), category
    names by id) of a COCO-format json. Errors name the file and the image."""
    images, names = coco_images(path)
    files, all_boxes, all_classes = [], [], []
    for file, boxes, classes in images:
        padded, padded_classes = pad_boxes(boxes, classes, max_boxes, f"{path} image {file}")
        files.append(file)
        all_boxes.append(padded)
        all_classes.append(padded_classes)
    return files, np.stack(all_boxes), np.stack(all_classes), names


def coco_class_names(names):
    """The class names of category names by id: one per id up to the largest (num_classes is
    the largest id + 1, as DETR), "unused_ID" for the ids no category has."""
    return [names.get(i, f"unused_{i}") for i in range(max(names) + 1)]


def coco_images(path):
    """([(image file, boxes [[x0, y0, x1, y1]] pixels, category ids)] per image, unpadded,
    category names by id) of a COCO-format json; every image is found before this returns."""
    with open(path) as f:
        try:
            coco = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON file ({e})") from e
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise ValueError(f"{path}: not a COCO detection file (no {key!r})")
    root = os.path.dirname(os.path.abspath(path))
    names = {int(c["id"]): c["name"] for c in coco["categories"]}
    per_image = {int(im["id"]): [] for im in coco["images"]}
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        if int(ann["category_id"]) not in names:
            raise ValueError(f"{path}: annotation {ann.get('id')} has category_id "
                             f"{ann['category_id']}, not among the categories")
        per_image.setdefault(int(ann["image_id"]), []).append(ann)
    images = []
    for image in coco["images"]:
        file = _find_image(root, image["file_name"])
        width, height = float(image["width"]), float(image["height"])
        boxes, classes = [], []
        for ann in per_image.get(int(image["id"]), []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x1 > x0 and y1 > y0:
                boxes.append([x0, y0, x1, y1])
                classes.append(int(ann["category_id"]))
        images.append((file, boxes, classes))
    if not images:
        raise ValueError(f"{path}: no images")
    return images, names


def _find_image(root, file_name):
    for folder in (root, os.path.join(root, "images"), os.path.join(os.path.dirname(root),
                                                                     "images")):
        candidate = os.path.join(folder, file_name)
        if os.path.exists(candidate):
            return candidate
    raise ValueError(f"image {file_name!r} not found next to the annotations in {root}")


# TFRecord boxes: pixel xyxy, as the COCO reader gives them (not normalised as in the TF
# Object Detection API's image/object/bbox/*, hence other keys).
BOX_KEYS = tuple(f"image/object/bbox/{side}_px" for side in ("xmin", "ymin", "xmax", "ymax"))
CLASS_KEY = "image/object/class/label"


def write_detection_tfrecord(annotations, output_path, *, shards=1):
    """Converts a COCO-format json (and its images) to TFRecord shards (docs/data.md) and
    OUTPUT.index.json; returns the [(path, count)] written. The boxes are those ``coco:``
    reads (crowds left out, clipped, empty ones dropped), unpadded: the reader pads them to
    its ``max_boxes``; the index holds the largest box count of an image."""
    from keras_vit.data import folder

    images, names = coco_images(annotations)  # every image found before anything is written

    def records():
        for i in folder.writing_order(len(images)):
            file, boxes, classes = images[i]
            boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
            features = folder.image_features(file)
            features["image/filename"] = folder._feature(os.path.basename(file).encode())
            features.update({key: folder.list_feature(boxes[:, i], "float")
                             for i, key in enumerate(BOX_KEYS)})
            features[CLASS_KEY] = folder.list_feature(classes, "int64")
            yield folder.serialize_example(features)

    written = folder.write_shards(output_path, records(), shards)
    folder.write_shard_index(output_path + folder.INDEX_SUFFIX, written,
                             coco_class_names(names), task="detection",
                             max_boxes_per_image=max(len(c) for _, _, c in images))
    return written


def read_detection_tfrecord(pattern, *, max_boxes=DEFAULT_MAX_BOXES):
    """(Examples of (image uint8, boxes (max_boxes, 4) xyxy pixels, classes (max_boxes,) -1
    padded) of the shards matching ``pattern``, class names). An image with more boxes than
    ``max_boxes`` (the index's largest count) is an error, as in ``pad_boxes``."""
    import tensorflow as tf

    from keras_vit.data import folder

    spec = {key: tf.io.VarLenFeature(tf.float32) for key in BOX_KEYS}
    spec.update({"image/encoded": tf.io.FixedLenFeature([], tf.string),
                 CLASS_KEY: tf.io.VarLenFeature(tf.int64)})

    def objects(ex):
        boxes = tf.stack([tf.sparse.to_dense(ex[key]) for key in BOX_KEYS], axis=1)
        return boxes, tf.cast(tf.sparse.to_dense(ex[CLASS_KEY]), tf.int32)

    def count_records(files):  # no index: one pass for the counts, ids and box counts
        counts, largest_id, most = [], 0, 0
        for path in files:
            counts.append(0)
            for raw in tf.data.TFRecordDataset(path):
                _, classes = objects(tf.io.parse_single_example(raw, spec))
                largest_id = max([largest_id] + classes.numpy().tolist())
                most = max(most, int(classes.shape[0]))
                counts[-1] += 1
        return counts, {"class_names": [str(i) for i in range(largest_id + 1)],
                        "max_boxes_per_image": most}

    shards, fields = folder.tfrecord_shards(pattern, count_records)
    folder.check_index_task(fields, "detection", pattern)
    most = fields.get("max_boxes_per_image", 0)
    if most > max_boxes:
        raise ValueError(f"{pattern}: an image has {most} boxes, more than max_boxes="
                         f"{max_boxes}")

    def parse(raw):
        ex = tf.io.parse_single_example(raw, spec)
        boxes, classes = objects(ex)
        count = tf.shape(classes)[0]
        fits = tf.debugging.assert_less_equal(count, max_boxes, message=(
            f"a TFRecord image has more boxes than max_boxes={max_boxes}"))
        with tf.control_dependencies([fits]):
            pad = max_boxes - count
        boxes = tf.ensure_shape(tf.pad(boxes, [[0, pad], [0, 0]]), (max_boxes, 4))
        classes = tf.ensure_shape(tf.pad(classes, [[0, pad]], constant_values=-1),
                                  (max_boxes,))
        return folder.decode_image(ex["image/encoded"]), boxes, classes

    examples = Examples(sum(count for _, count in shards), shards=shards, parse=parse)
    return examples, list(fields.get("class_names", []))


def load_detection_dataset(spec, split="train", **kwargs):
    """Unbatched (image uint8, boxes (M, 4) xyxy pixels, classes (M,) -1 padded) and the
    DatasetInfo; the arguments of ``load_detection_examples``."""
    examples, info = load_detection_examples(spec, split, **kwargs)
    return examples.as_dataset(), info


def load_detection_examples(spec, split="train", *, img_size=64, seed=0, num_samples=None,
                            max_boxes=DEFAULT_MAX_BOXES):
    """The split as Examples (keras_vit/data/stream.py) of unbatched (image uint8, boxes
    (M, 4) xyxy pixels, classes (M,) -1 padded) and the
    DatasetInfo (num_classes: shapes 8; COCO the largest category id + 1, as DETR).

    spec: "shapes" (1-3 shapes per image), "coco:ANNOTATIONS.json" (for ``split``
    "validation", a ``{train -> val}`` sibling file name is used when the spec names the
    training file: instances_train2017.json -> instances_val2017.json) or "tfrecord:GLOB"
    (shards of ``write_detection_tfrecord``: one split, whatever ``split``).
    """
    import tensorflow as tf

    kind, _, arg = spec.partition(":")
    if kind == "shapes":
        n = num_samples or DEFAULT_SHAPES_SAMPLES.get(split, 500)
        data = shapes.generate(n, img_size, seed=seed, split=split, min_shapes=1, max_shapes=3)
        padded = [pad_boxes(b, c, max_boxes) for b, c in zip(data["boxes"], data["classes"])]
        boxes = np.stack([p[0] for p in padded])
        classes = np.stack([p[1] for p in padded])
        return (Examples(n, keys=(data["images"], boxes, classes)),
                DatasetInfo(len(shapes.CLASS_NAMES), list(shapes.CLASS_NAMES), n))
    if kind == "coco":
        path = arg
        if split != "train" and "train" in os.path.basename(path):
            path = os.path.join(os.path.dirname(path),
                                os.path.basename(path).replace("train", "val"))
        if not os.path.exists(path):
            raise ValueError(f"COCO annotations {path!r} do not exist")
        files, boxes, classes, names = read_coco(path, max_boxes)
        if num_samples:
            files, boxes, classes = files[:num_samples], boxes[:num_samples], classes[:num_samples]

        def read(data, image_boxes, image_classes):
            from keras_vit.data import folder

            return folder.decode_image(data), image_boxes, image_classes

        examples = Examples(len(files), keys=(np.asarray(files), boxes, classes), read=read,
                            reads_files=True)
        class_names = coco_class_names(names)
        return examples, DatasetInfo(len(class_names), class_names, len(files))
    if kind == "tfrecord":
        examples, class_names = read_detection_tfrecord(arg, max_boxes=max_boxes)
        examples = examples.take(num_samples)
        return examples, DatasetInfo(len(class_names), class_names, examples.count)
    raise ValueError(f"a detection dataset is shapes, coco:ANNOTATIONS.json or tfrecord:GLOB, "
                     f"got {spec!r}")


def make_detection_pipeline(ds, *, training, img_size, batch_size, mean=(0.485, 0.456, 0.406),
                            std=(0.229, 0.224, 0.225), seed=0, scale_range=(0.6, 1.0),
                            shuffle_buffer=1024, repeat=False, drop_remainder=None, start=0,
                            worker=0, num_workers=1):
    """Batched (images (B, S, S, 3) normalised, {"classes", "boxes"}) with S = img_size.

    Every image is resized keeping its aspect ratio so that its longer side is S, then
    padded at the bottom / right to S x S (boxes normalised to that canvas). Training first
    flips horizontally (p = 0.5) and crops a random window of ``scale_range`` of each side
    (DETR's random crop); boxes move with the pixels, are clipped to the crop, and those left
    with no area become padding. Deterministic for a seed.
    """
    import tensorflow as tf

    size = int(img_size)
    mean = tf.constant(np.asarray(mean, np.float32) * 255.0)
    std = tf.constant(np.asarray(std, np.float32) * 255.0)
    drop_remainder = training if drop_remainder is None else drop_remainder

    def augment(i, item):
        image, boxes, classes = item
        s = tf.stack([tf.cast(seed, tf.int64), i])
        hw = tf.cast(tf.shape(image)[:2], tf.float32)
        valid = classes >= 0
        flip = tf.random.stateless_uniform([], s) < 0.5
        image = tf.where(flip, tf.image.flip_left_right(image), image)
        flipped = tf.stack([hw[1] - boxes[:, 2], boxes[:, 1], hw[1] - boxes[:, 0], boxes[:, 3]],
                           axis=1)
        boxes = tf.where(flip, flipped, boxes)
        fraction = tf.random.stateless_uniform([2], s + 1, scale_range[0], scale_range[1])
        crop_hw = tf.maximum(tf.round(hw * fraction), 1.0)
        offset = tf.floor(tf.random.stateless_uniform([2], s + 2) * (hw - crop_hw + 1.0))
        crop_i = tf.cast(tf.concat([offset, crop_hw], 0), tf.int32)
        image = image[crop_i[0]:crop_i[0] + crop_i[2], crop_i[1]:crop_i[1] + crop_i[3]]
        shift = tf.stack([offset[1], offset[0], offset[1], offset[0]])
        limit = tf.stack([crop_hw[1], crop_hw[0], crop_hw[1], crop_hw[0]])
        boxes = tf.clip_by_value(boxes - shift, 0.0, limit)
        kept = valid & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return image, tf.where(kept[:, None], boxes, 0.0), tf.where(kept, classes, -1)

    def letterbox(image, boxes, classes):
        hw = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = size / tf.reduce_max(hw)
        new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
        image = tf.image.resize(tf.cast(image, tf.float32), new_hw, method="bilinear",
                                antialias=True)
        image = tf.image.pad_to_bounding_box(image, 0, 0, size, size)
        # Pixel boxes -> the S x S canvas, normalised cxcywh; padding stays zeros.
        canvas = boxes * scale / size
        cxcywh = tf.stack([(canvas[:, 0] + canvas[:, 2]) / 2, (canvas[:, 1] + canvas[:, 3]) / 2,
                           canvas[:, 2] - canvas[:, 0], canvas[:, 3] - canvas[:, 1]], axis=1)
        cxcywh = tf.where((classes >= 0)[:, None], cxcywh, 0.0)
        image = (tf.ensure_shape(tf.clip_by_value(image, 0, 255), (size, size, 3)) - mean) / std
        return image, {"classes": tf.cast(classes, tf.int32), "boxes": cxcywh}

    if training:
        ds = training_elements(ds, seed=seed, shuffle_buffer=shuffle_buffer, repeat=repeat,
                               start=start, worker=worker, num_workers=num_workers)
        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.as_dataset() if isinstance(ds, Examples) else ds
        ds = ds.repeat() if repeat else ds
    ds = ds.map(letterbox, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
