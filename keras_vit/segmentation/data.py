"""Segmentation data: the embedded shapes in segmentation mode, image + mask folders, and
the training / evaluation pipelines that keep masks aligned with their images.

Folder layout (ADE20K's, ``ADEChallengeData2016``)::

    PATH/images/<split>/NAME.jpg        (any of .jpg .jpeg .png .bmp)
    PATH/annotations/<split>/NAME.png   (index or palette PNG, one class id per pixel)
    PATH/classes.txt                    (optional: one class name per line)

``<split>`` is ``training`` or ``train``, ``validation`` or ``val``. Masks hold class ids;
255 is ignored. ``reduce_zero_label`` (ADE20K's convention: 0 is "other") maps 0 to 255 and
every other id to id - 1. Every pair is checked on the host before training: a mask whose
size differs from its image, a missing mask or a label outside the classes is a ValueError
naming the file with ``strict``, otherwise the pair is skipped and counted, as the
classification folders do.

``tfrecord:GLOB`` reads the shards ``write_segmentation_tfrecord`` (tools/make_tfrecords.py)
writes from such a folder: the same pairs, masks stored raw (docs/data.md has the schema).
"""

import os

import numpy as np
from absl import logging

from keras_vit.data import DatasetInfo, Examples, shapes, training_elements
from keras_vit.segmentation.losses import IGNORE_INDEX

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
SPLIT_DIRS = {"train": ("training", "train"), "validation": ("validation", "val"),
              "test": ("test", "testing")}
SHAPES_CLASS_NAMES = ("background",) + tuple(shapes.CLASS_NAMES)
DEFAULT_SHAPES_SAMPLES = {"train": 2000, "validation": 500, "test": 500}


def read_mask(path):
    """A mask file as (H, W) uint8 class ids: index PNGs as stored, palette PNGs by their
    indices (not their colours). RGB masks are refused: their colours are not class ids."""
    from PIL import Image

    with Image.open(path) as mask:
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{path}: mask mode {mask.mode!r}; expected an index (L) or "
                             "palette (P) PNG holding one class id per pixel")
        ids = np.asarray(mask)
    if ids.max(initial=0) > 255:
        raise ValueError(f"{path}: class id {int(ids.max())} does not fit the uint8 masks")
    return ids.astype(np.uint8)


def _split_dir(root, kind, split):
    for name in SPLIT_DIRS.get(split, (split,)):
        path = os.path.join(root, kind, name)
        if os.path.isdir(path):
            return path
    raise ValueError(f"no {split!r} split in {root!r}: expected {kind}/"
                     f"{' or '.join(SPLIT_DIRS.get(split, (split,)))} (docs/data.md)")


def read_class_names(root):
    path = os.path.join(root, "classes.txt")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def scan_mask_folder(root, split, *, num_classes=None, reduce_zero_label=False, strict=False):
    """(image files, mask files, class names, skipped 'file: reason' list) of a split.

    The class count comes from ``num_classes``, else classes.txt, else the largest id
    found (+1). Labels are checked after ``reduce_zero_label``."""
    from PIL import Image

    image_dir = _split_dir(root, "images", split)
    mask_dir = _split_dir(root, "annotations", split)
    names = read_class_names(root)
    if num_classes is None and names is not None:
        num_classes = len(names)
    images, masks, skipped, largest = [], [], [], 0

    def reject(path, reason):
        if strict:
            raise ValueError(f"{path}: {reason}")
        skipped.append(f"{path}: {reason}")

    for name in sorted(os.listdir(image_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        image_path = os.path.join(image_dir, name)
        mask_path = os.path.join(mask_dir, stem + ".png")
        if not os.path.exists(mask_path):
            reject(image_path, f"no mask {mask_path}")
            continue
        try:
            with Image.open(image_path) as image:
                image_size = image.size
            ids = reduce_labels(read_mask(mask_path)) if reduce_zero_label else read_mask(
                mask_path)
        except (OSError, ValueError) as e:
            reject(mask_path, f"unreadable ({e})")
            continue
        if ids.shape[::-1] != image_size:
            reject(mask_path, f"mask is {ids.shape[1]}x{ids.shape[0]}, its image "
                              f"{image_size[0]}x{image_size[1]}")
            continue
        labels = ids[ids != IGNORE_INDEX]
        top = int(labels.max(initial=0))
        if num_classes is not None and top >= num_classes:
            reject(mask_path, f"label {top} is outside the {num_classes} classes "
                              f"(0..{num_classes - 1}, {IGNORE_INDEX} ignored)")
            continue
        largest = max(largest, top)
        images.append(image_path)
        masks.append(mask_path)
    if not images:
        raise ValueError(f"no usable image/mask pair in {image_dir} and {mask_dir}"
                         + (f" ({len(skipped)} skipped: {skipped[0]} ...)" if skipped else ""))
    if skipped:
        logging.warning("skipped %d image/mask pair(s) of %s: %s", len(skipped), root,
                        "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    num_classes = num_classes or largest + 1
    names = names or [str(i) for i in range(num_classes)]
    return images, masks, names, skipped


def reduce_labels(ids):
    """ADE20K's reduce_zero_label: 0 ("other") -> ignored, every other id -> id - 1."""
    ids = ids.astype(np.int32) - 1
    ids[ids < 0] = IGNORE_INDEX
    ids[ids == IGNORE_INDEX - 1] = IGNORE_INDEX  # 255 stays ignored
    return ids.astype(np.uint8)


# TFRecord masks: the raw ids of read_mask (palette PNGs by index) re-encoded as an 8-bit
# single-channel PNG, so that tf.io.decode_png(channels=1) gives them back exactly.
MASK_KEY = "image/segmentation/class/encoded"


def write_segmentation_tfrecord(root, output_path, *, split="train", shards=1,
                                num_classes=None, reduce_zero_label=False, strict=False):
    """Converts a split of a segmentation folder (the module docstring's layout) to TFRecord
    shards (docs/data.md) and OUTPUT.index.json; returns the [(path, count)] written.

    The pairs are those ``folder:ROOT`` keeps with the same ``num_classes``,
    ``reduce_zero_label`` and ``strict`` (checked before anything is written). Masks are
    stored raw, without reduce_zero_label: the reader applies it, and requires the setting
    recorded in the index (the class names and the checks were made for it)."""
    import io

    from PIL import Image

    from keras_vit.data import folder

    images, masks, names, _ = scan_mask_folder(root, split, num_classes=num_classes,
                                               reduce_zero_label=reduce_zero_label,
                                               strict=strict)
    largest = [0]

    def records():
        for i in folder.writing_order(len(images)):
            image_path, mask_path = images[i], masks[i]
            ids = read_mask(mask_path)
            labels = reduce_labels(ids) if reduce_zero_label else ids
            largest[0] = max(largest[0], int(labels[labels != IGNORE_INDEX].max(initial=0)))
            png = io.BytesIO()
            Image.fromarray(ids).save(png, format="PNG")
            features = folder.image_features(image_path)
            features.update({
                "image/filename": folder._feature(os.path.basename(image_path).encode()),
                MASK_KEY: folder._feature(png.getvalue()),
                "image/segmentation/class/format": folder._feature(b"png")})
            yield folder.serialize_example(features)

    written = folder.write_shards(output_path, records(), shards)
    folder.write_shard_index(output_path + folder.INDEX_SUFFIX, written, names,
                             task="segmentation", reduce_zero_label=bool(reduce_zero_label),
                             largest_label=largest[0])
    return written


def read_segmentation_tfrecord(pattern, *, num_classes=None, reduce_zero_label=False):
    """(Examples of (image uint8 (H, W, 3), mask uint8 (H, W)) of the shards matching
    ``pattern``, class names, num_classes); reduce_zero_label is applied here, to the raw
    masks the records hold."""
    import tensorflow as tf

    from keras_vit.data import folder

    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
            MASK_KEY: tf.io.FixedLenFeature([], tf.string)}
    # reduce_labels of every uint8 id, looked up in the graph: the folder reader's mapping
    table = tf.constant(reduce_labels(np.arange(256)) if reduce_zero_label
                        else np.arange(256, dtype=np.uint8))

    def decode_mask(data):
        return tf.gather(table, tf.cast(tf.io.decode_png(data, channels=1)[..., 0], tf.int32))

    def count_records(files):  # no index: one pass for the counts and the largest label
        counts, largest = [], 0
        for path in files:
            counts.append(0)
            for raw in tf.data.TFRecordDataset(path):
                labels = decode_mask(tf.io.parse_single_example(raw, spec)[MASK_KEY]).numpy()
                largest = max(largest, int(labels[labels != IGNORE_INDEX].max(initial=0)))
                counts[-1] += 1
        return counts, {"class_names": [str(i) for i in range(largest + 1)],
                        "largest_label": largest, "reduce_zero_label": bool(reduce_zero_label)}

    shards, fields = folder.tfrecord_shards(pattern, count_records)
    folder.check_index_task(fields, "segmentation", pattern)
    if fields.get("reduce_zero_label", reduce_zero_label) != bool(reduce_zero_label):
        raise ValueError(f"the TFRecord files {pattern!r} were written for reduce_zero_label="
                         f"{fields['reduce_zero_label']} (their index: the class names and "
                         f"label checks assume it); read them with the same setting")
    names = list(fields.get("class_names", []))
    largest = fields.get("largest_label")
    if num_classes is not None and largest is not None and largest >= num_classes:
        raise ValueError(f"{pattern}: label {largest} is outside the {num_classes} classes "
                         f"(0..{num_classes - 1}, {IGNORE_INDEX} ignored)")

    def parse(raw):
        ex = tf.io.parse_single_example(raw, spec)
        image, mask = folder.decode_image(ex["image/encoded"]), decode_mask(ex[MASK_KEY])
        same = tf.debugging.assert_equal(tf.shape(image)[:2], tf.shape(mask),
                                         message="a TFRecord mask's size differs from its image's")
        with tf.control_dependencies([same]):
            return tf.identity(image), tf.ensure_shape(mask, (None, None))

    examples = Examples(sum(count for _, count in shards), shards=shards, parse=parse)
    return examples, names, num_classes or len(names)


def load_segmentation_dataset(spec, split="train", **kwargs):
    """Unbatched (image uint8 (H, W, 3), mask uint8 (H, W)) pairs and their DatasetInfo.

    spec: "shapes" (1-3 shapes per image; class 0 is the background, 1..8 the shapes) or
    "folder:PATH" (the layout of the module docstring) or "tfrecord:GLOB" (shards of
    ``write_segmentation_tfrecord``: one split, whatever ``split``); the keywords of
    ``load_segmentation_examples``.
    """
    examples, info = load_segmentation_examples(spec, split, **kwargs)
    return examples.as_dataset(), info


def load_segmentation_examples(spec, split="train", *, img_size=64, seed=0, num_samples=None,
                               strict=False, num_classes=None, reduce_zero_label=False):
    """The split as Examples (keras_vit/data/stream.py) and its DatasetInfo."""
    import tensorflow as tf

    kind, _, arg = spec.partition(":")
    if kind == "shapes":
        n = num_samples or DEFAULT_SHAPES_SAMPLES.get(split, 500)
        data = shapes.generate(n, img_size, seed=seed, split=split, min_shapes=1, max_shapes=3)
        return (Examples(n, keys=(data["images"], data["semantic_masks"])),
                DatasetInfo(len(SHAPES_CLASS_NAMES), list(SHAPES_CLASS_NAMES), n))
    if kind == "folder":
        if not os.path.isdir(arg):
            raise ValueError(f"segmentation folder {arg!r} does not exist")
        images, masks, names, skipped = scan_mask_folder(
            arg, split, num_classes=num_classes, reduce_zero_label=reduce_zero_label,
            strict=strict)
        if num_samples:
            images, masks = images[:num_samples], masks[:num_samples]

        def read(image_data, mask_path):
            from keras_vit.data import folder

            image = folder.decode_image(image_data)
            mask = tf.numpy_function(
                lambda p: (reduce_labels(read_mask(p.decode())) if reduce_zero_label
                           else read_mask(p.decode())), [mask_path], tf.uint8, stateful=False)
            return image, tf.ensure_shape(mask, (None, None))

        examples = Examples(len(images), keys=(np.asarray(images), np.asarray(masks)), read=read,
                            reads_files=True)
        return examples, DatasetInfo(len(names), names, len(images), len(skipped), skipped)
    if kind == "tfrecord":
        examples, names, count_classes = read_segmentation_tfrecord(
            arg, num_classes=num_classes, reduce_zero_label=reduce_zero_label)
        examples = examples.take(num_samples)
        return examples, DatasetInfo(count_classes, names, examples.count)
    raise ValueError(f"a segmentation dataset is shapes, folder:PATH or tfrecord:GLOB, got "
                     f"{spec!r}")


def make_segmentation_pipeline(ds, *, training, img_size, batch_size, mean=(0.485, 0.456, 0.406),
                               std=(0.229, 0.224, 0.225), seed=0, scale_range=(0.5, 2.0),
                               shuffle_buffer=1024, repeat=False, drop_remainder=None, start=0,
                               worker=0, num_workers=1):
    """Batched (images float32 NHWC normalised, masks int32 (B, S, S)), S = img_size.

    Train (mmseg's recipe): seeded shuffle; resize by a random factor in ``scale_range``
    of the size that makes the short side S (image bilinear, mask nearest); pad to at least
    S x S (image 0, mask ignored); a random S x S crop; a horizontal flip. Eval: image and
    mask resized to S x S (bilinear / nearest). Deterministic for a seed. ``ds``: Examples
    or a tf.data.Dataset; ``start``, ``worker``, ``num_workers`` place a training stream
    (``keras_vit.data.make_pipeline``).
    """
    import tensorflow as tf

    size = int(img_size)
    mean = tf.constant(np.asarray(mean, np.float32) * 255.0)
    std = tf.constant(np.asarray(std, np.float32) * 255.0)
    drop_remainder = training if drop_remainder is None else drop_remainder

    def resize_pair(image, mask, new_size):
        image = tf.image.resize(tf.cast(image, tf.float32), new_size, method="bilinear")
        mask = tf.image.resize(mask[..., None], new_size, method="nearest")[..., 0]
        return image, mask

    def augment(i, item):
        image, mask = item
        s = tf.stack([tf.cast(seed, tf.int64), i])
        hw = tf.cast(tf.shape(image)[:2], tf.float32)
        factor = tf.random.stateless_uniform([], s, scale_range[0], scale_range[1])
        new_size = tf.cast(tf.round(hw * size / tf.reduce_min(hw) * factor), tf.int32)
        image, mask = resize_pair(image, mask, new_size)
        pad_h = tf.maximum(size - new_size[0], 0)
        pad_w = tf.maximum(size - new_size[1], 0)
        image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
        mask = tf.pad(mask, [[0, pad_h], [0, pad_w]], constant_values=IGNORE_INDEX)
        full = tf.shape(mask)
        top = tf.random.stateless_uniform([], s + 1, 0, full[0] - size + 1, tf.int32)
        left = tf.random.stateless_uniform([], s + 2, 0, full[1] - size + 1, tf.int32)
        image = image[top:top + size, left:left + size]
        mask = mask[top:top + size, left:left + size]
        flip = tf.random.stateless_uniform([], s + 3) < 0.5
        image = tf.where(flip, tf.image.flip_left_right(image), image)
        mask = tf.where(flip, mask[:, ::-1], mask)
        return image, mask

    if training:
        ds = training_elements(ds, seed=seed, shuffle_buffer=shuffle_buffer, repeat=repeat,
                               start=start, worker=worker, num_workers=num_workers)
        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.as_dataset() if isinstance(ds, Examples) else ds
        ds = ds.map(lambda image, mask: resize_pair(image, mask, (size, size)),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if repeat:
            ds = ds.repeat()

    def finish(image, mask):
        image = tf.ensure_shape(tf.clip_by_value(image, 0, 255), (size, size, 3))
        return (image - mean) / std, tf.cast(tf.ensure_shape(mask, (size, size)), tf.int32)

    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
