"""Image folders (PATH/<class>/<image>) and TFRecord files.

TFRecord schema (one tf.train.Example per image):
  image/encoded      bytes   the image file's bytes (JPEG, PNG, BMP or GIF)
  image/format       bytes   "jpeg", "png", "bmp" or "gif"
  image/class/label  int64   class index (sorted class-folder order)
  image/class/text   bytes   class name
  image/height       int64
  image/width        int64
"""

import glob
import os

import numpy as np
from absl import logging

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def scan_folder(path, strict=False):
    """(files, labels, class_names, skipped_files). Unreadable images are skipped and
    reported, or with ``strict`` raise a ValueError naming the file."""
    from PIL import Image

    if not os.path.isdir(path):
        raise ValueError(f"image folder {path!r} does not exist")
    class_names = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not class_names:
        raise ValueError(f"image folder {path!r} has no class subfolders (expected "
                         f"{path}/<class>/<image>)")
    files, labels, skipped = [], [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(path, name)
        candidates = sorted(f for f in os.listdir(class_dir)
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        good = 0
        for f in candidates:
            full = os.path.join(class_dir, f)
            try:
                with Image.open(full) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types for corrupt data
                if strict:
                    raise ValueError(f"unreadable image {full!r}: {e}") from e
                skipped.append(full)
                continue
            files.append(full)
            labels.append(label)
            good += 1
        if good == 0:
            raise ValueError(f"class {name!r} in {path!r} has no readable images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
    if skipped:
        logging.warning("skipped %d unreadable image(s) in %s: %s", len(skipped), path,
                        ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    return files, np.asarray(labels, np.int32), class_names, skipped


def decode_image(data):
    """Bytes of a JPEG/PNG/BMP/GIF -> uint8 (H, W, 3) tensor (GIF: the first frame)."""
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _feature(value):
    import tensorflow as tf

    if isinstance(value, int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def write_tfrecord(folder, output_path, *, shards=1, strict=False):
    """Converts an image folder to TFRecord file(s) with the schema above; returns DatasetInfo.

    With shards > 1 the files are OUTPUT-00000-of-0000N."""
    import tensorflow as tf
    from PIL import Image

    from keras_vit.data import DatasetInfo

    files, labels, class_names, skipped = scan_folder(folder, strict)
    paths = [output_path] if shards == 1 else \
        [f"{output_path}-{i:05d}-of-{shards:05d}" for i in range(shards)]
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    try:
        for i, (f, label) in enumerate(zip(files, labels)):
            with open(f, "rb") as fh:
                data = fh.read()
            with Image.open(f) as im:
                width, height = im.size
                fmt = (im.format or "jpeg").lower()
            example = tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": _feature(data), "image/format": _feature(fmt.encode()),
                "image/class/label": _feature(int(label)),
                "image/class/text": _feature(class_names[label].encode()),
                "image/height": _feature(height), "image/width": _feature(width)}))
            writers[i % shards].write(example.SerializeToString())
    finally:
        for w in writers:
            w.close()
    return DatasetInfo(len(class_names), class_names, len(files), len(skipped), skipped)


def read_tfrecord(pattern):
    """(dataset of (image uint8, label int32), num_classes, class_names, count)."""
    import tensorflow as tf

    files = sorted(glob.glob(pattern))
    if not files:
        raise ValueError(f"no TFRecord files match {pattern!r}")
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([], tf.int64),
            "image/class/text": tf.io.FixedLenFeature([], tf.string, default_value=b"")}
    names, count = {}, 0
    for raw in tf.data.TFRecordDataset(files):  # one pass for the class table and count
        ex = tf.io.parse_single_example(raw, spec)
        names[int(ex["image/class/label"])] = ex["image/class/text"].numpy().decode()
        count += 1
    num_classes = max(names) + 1 if names else 0
    class_names = [names.get(i, str(i)) for i in range(num_classes)]

    def parse(raw):
        ex = tf.io.parse_single_example(raw, spec)
        return decode_image(ex["image/encoded"]), tf.cast(ex["image/class/label"], tf.int32)

    ds = tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    return ds, num_classes, class_names, count
