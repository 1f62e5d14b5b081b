"""Image folders (PATH/<class>/<image>) and TFRecord files.

TFRecord schema (one tf.train.Example per image):
  image/encoded      bytes   the image file's bytes (JPEG, PNG, BMP or GIF)
  image/format       bytes   "jpeg", "png", "bmp" or "gif"
  image/class/label  int64   class index (sorted class-folder order)
  image/class/text   bytes   class name
  image/height       int64
  image/width        int64
"""

import os

import numpy as np
from absl import logging

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def list_folder(path):
    """(image files, labels, class_names) of PATH/<class>/<image>, sorted, unopened."""
    if not os.path.isdir(path):
        raise ValueError(f"image folder {path!r} does not exist")
    class_names = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not class_names:
        raise ValueError(f"image folder {path!r} has no class subfolders (expected "
                         f"{path}/<class>/<image>)")
    files, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(path, name)
        found = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        files += [os.path.join(class_dir, f) for f in found]
        labels += [label] * len(found)
    return files, np.asarray(labels, np.int32), class_names


def readable_images(files, strict=False):
    """A bool per file: PIL can read it. Unreadable ones are reported, or with ``strict``
    raise a ValueError naming the file."""
    from PIL import Image

    ok = np.ones(len(files), bool)
    for i, full in enumerate(files):
        try:
            with Image.open(full) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for corrupt data
            if strict:
                raise ValueError(f"unreadable image {full!r}: {e}") from e
            ok[i] = False
    skipped = [f for f, good in zip(files, ok) if not good]
    if skipped:
        logging.warning("skipped %d unreadable image(s): %s", len(skipped),
                        ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    return ok


def scan_folder(path, strict=False):
    """(files, labels, class_names, skipped_files), every image checked. Unreadable images
    are skipped and reported, or with ``strict`` raise a ValueError naming the file."""
    files, labels, class_names = list_folder(path)
    ok = readable_images(files, strict)
    for label, name in enumerate(class_names):
        if not (ok & (labels == label)).any():
            raise ValueError(f"class {name!r} in {path!r} has no readable images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
    skipped = [f for f, good in zip(files, ok) if not good]
    return [f for f, good in zip(files, ok) if good], labels[ok], class_names, skipped


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

    With shards > 1 the files are OUTPUT-00000-of-0000N; OUTPUT.index.json holds each
    file's record count and the class names (readers then need no pass over the data)."""
    from keras_vit.data import DatasetInfo

    files, labels, class_names, skipped = scan_folder(folder, strict)
    shard_paths(output_path, shards)  # a bad count fails before anything is written

    def records():
        for i in writing_order(len(files)):
            f, label = files[i], labels[i]
            yield serialize_example(dict(
                image_features(f), **{"image/class/label": _feature(int(label)),
                                      "image/class/text": _feature(class_names[label].encode())}))

    written = write_shards(output_path, records(), shards)
    write_shard_index(output_path + INDEX_SUFFIX, written, class_names, task="classification")
    return DatasetInfo(len(class_names), class_names, len(files), len(skipped), skipped)


INDEX_SUFFIX = ".index.json"


def write_shard_index(index_path, shards, class_names, **extra):
    """The JSON next to TFRecord shards that readers trust instead of a pass over the data:
    each shard's record count (by file name) and the class names (docs/data.md)."""
    import json

    import tensorflow as tf

    index = dict(extra, class_names=list(class_names),
                 shards={os.path.basename(path): int(count) for path, count in shards})
    partial = index_path + ".partial"  # renamed into place: never a half-written index
    with tf.io.gfile.GFile(partial, "w") as f:
        json.dump(index, f, indent=1)
    tf.io.gfile.rename(partial, index_path, overwrite=True)


def shard_paths(output_path, shards):
    """The files of ``shards`` TFRecord shards: ``output_path`` itself for one, else
    OUTPUT-00000-of-0000N ... (write_tfrecord's names)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shards == 1:
        return [output_path]
    return [f"{output_path}-{i:05d}-of-{shards:05d}" for i in range(shards)]


def writing_order(count, seed=0):
    """The order in which a writer serialises its ``count`` examples: a seeded permutation,
    so that every shard (and every window a reader shuffles) mixes the classes; folders list
    them class by class."""
    return np.random.default_rng(seed).permutation(count)


def write_shards(output_path, records, shards=1):
    """Serialised records dealt round-robin (record i -> shard i % shards) to
    ``shard_paths(output_path, shards)``; returns [(path, record count)] for
    ``write_shard_index``, which the caller writes after this returns. An earlier index at
    OUTPUT.index.json is removed first: a run that fails midway leaves no index that lies
    about the files."""
    import tensorflow as tf

    paths = shard_paths(output_path, shards)
    if tf.io.gfile.exists(output_path + INDEX_SUFFIX):
        tf.io.gfile.remove(output_path + INDEX_SUFFIX)
    if "://" not in output_path:
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    counts = [0] * shards
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    try:
        for i, record in enumerate(records):
            writers[i % shards].write(record)
            counts[i % shards] += 1
    finally:
        for w in writers:
            w.close()
    return list(zip(paths, counts))


def image_features(path):
    """The tf.train.Example features of one image file as stored: image/encoded (its bytes),
    image/format, image/height, image/width."""
    from PIL import Image

    with open(path, "rb") as fh:
        data = fh.read()
    with Image.open(path) as im:
        width, height = im.size
        fmt = (im.format or "jpeg").lower()
    return {"image/encoded": _feature(data), "image/format": _feature(fmt.encode()),
            "image/height": _feature(height), "image/width": _feature(width)}


def list_feature(values, kind):
    """A float (``kind`` "float", stored float32) or int64 (``kind`` "int64") list feature."""
    import tensorflow as tf

    if kind == "float":
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def serialize_example(features):
    """One serialised tf.train.Example of a {key: tf.train.Feature} dict."""
    import tensorflow as tf

    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def check_index_task(fields, task, pattern):
    """A ValueError when the shards' index says they hold another task's records."""
    written = fields.get("task")
    if written not in (None, task):
        raise ValueError(f"the TFRecord files {pattern!r} hold {written} records (their "
                         f"index says so), not {task} records; write {task} records with "
                         f"tools/make_tfrecords.py --task={task}")


def tfrecord_shards(pattern, count_records):
    """([(path, record count)] of the files matching ``pattern`` (local or gs://...), sorted;
    the other fields of their index). The counts come from the index files next to the
    shards (``*.index.json``, written by tools/make_tfrecords.py), each trusted for the files
    it lists; when a matched file is in none, ``count_records(paths)`` reads the data once
    and returns (counts, fields) itself."""
    import json

    import tensorflow as tf

    files = sorted(f for f in tf.io.gfile.glob(pattern) if not f.endswith(INDEX_SUFFIX))
    if not files:
        raise ValueError(f"no TFRecord files match {pattern!r}")
    known, fields = {}, {}
    for directory in sorted({os.path.dirname(f) for f in files}):
        for index_path in sorted(tf.io.gfile.glob(os.path.join(directory, "*" + INDEX_SUFFIX))):
            with tf.io.gfile.GFile(index_path) as f:
                index = json.load(f)
            listed = {os.path.join(directory, name): int(count)
                      for name, count in index.get("shards", {}).items()}
            if not listed.keys() & set(files):
                continue  # another split's (or data set's) index in the same folder
            known.update(listed)
            for key, value in index.items():
                if key != "shards" and fields.setdefault(key, value) != value:
                    raise ValueError(f"the TFRecord files {pattern!r} come from indexes that "
                                     f"disagree on {key!r} ({fields[key]!r} vs {value!r} in "
                                     f"{index_path}); match one data set's shards")
    if all(f in known for f in files):
        return [(f, known[f]) for f in files], fields
    missing = [f for f in files if f not in known]
    logging.warning("no index for %d of %d TFRecord file(s) (%s...): reading them once to "
                    "count their records; tools/make_tfrecords.py writes the index",
                    len(missing), len(files), missing[0])
    counts, fields = count_records(files)
    return list(zip(files, counts)), fields


def read_tfrecord(pattern):
    """(Examples of (image uint8, label int32) in the shards matching ``pattern``, class
    names)."""
    import tensorflow as tf

    from keras_vit.data.stream import Examples

    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([], tf.int64),
            "image/class/text": tf.io.FixedLenFeature([], tf.string, default_value=b"")}

    def count_records(files):  # one pass over every record: counts and the class table
        names, counts = {}, []
        for path in files:
            counts.append(0)
            for raw in tf.data.TFRecordDataset(path):
                ex = tf.io.parse_single_example(raw, spec)
                names[int(ex["image/class/label"])] = ex["image/class/text"].numpy().decode()
                counts[-1] += 1
        num_classes = max(names) + 1 if names else 0
        return counts, {"class_names": [names.get(i, str(i)) for i in range(num_classes)]}

    shards, fields = tfrecord_shards(pattern, count_records)
    check_index_task(fields, "classification", pattern)

    def parse(raw):
        ex = tf.io.parse_single_example(raw, spec)
        return decode_image(ex["image/encoded"]), tf.cast(ex["image/class/label"], tf.int32)

    return (Examples(sum(c for _, c in shards), shards=shards, parse=parse),
            list(fields.get("class_names", [])))
