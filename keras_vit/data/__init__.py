"""tf.data pipelines: the embedded shapes dataset, image folders, TFRecord, TFDS; preprocessing."""

import dataclasses
import os

import numpy as np

from keras_vit.data import shapes
from keras_vit.data.folder import (decode_image, list_folder, read_tfrecord, readable_images,
                                   scan_folder, write_tfrecord)
from keras_vit.data.stream import (Examples, seeded_shuffle, share_source, training_elements,
                                   training_stream)

DEFAULT_SHAPES_SAMPLES = {"train": 10000, "validation": 2000, "test": 2000}


@dataclasses.dataclass
class DatasetInfo:
    num_classes: int
    class_names: list
    num_examples: int
    skipped: int = 0
    skipped_files: list = dataclasses.field(default_factory=list)


def load_dataset(spec, split="train", *, img_size=64, seed=0, num_samples=None, strict=False,
                 data_dir=None):
    """Unbatched (image uint8 (H, W, 3), label int32) and its DatasetInfo.

    spec: "shapes" | "folder:PATH" (PATH/<split>/<class>/... if that exists,
    else PATH/<class>/... for "train") | "tfrecord:GLOB" | "tfds:NAME".
    """
    examples, info = load_examples(spec, split, img_size=img_size, seed=seed,
                                   num_samples=num_samples, strict=strict, data_dir=data_dir)
    return examples.as_dataset(), info


def load_examples(spec, split="train", *, img_size=64, seed=0, num_samples=None, strict=False,
                  data_dir=None, share=(0, 1)):
    """The split as Examples (what a training stream addresses: keys and how to read one,
    or TFRecord shards) and its DatasetInfo; the arguments of ``load_dataset``. ``share``
    (worker, num_workers): an image folder on a worker of many is listed, and only the
    worker's files (``owner``) are opened to check them; num_examples stays the whole
    listing's, the same on every worker."""
    import tensorflow as tf

    kind, _, arg = spec.partition(":")
    if kind == "shapes":
        n = num_samples or DEFAULT_SHAPES_SAMPLES.get(split, 2000)
        data = shapes.generate(n, img_size, seed=seed, split=split)
        return (Examples(n, keys=(data["images"], data["labels"])),
                DatasetInfo(len(shapes.CLASS_NAMES), list(shapes.CLASS_NAMES), n))
    if kind == "folder":
        root = os.path.join(arg, split)
        if not os.path.isdir(root):
            if split != "train":
                raise ValueError(f"no {split!r} split in {arg!r} (expected {root})")
            root = arg
        read = lambda data, y: (decode_image(data), y)  # noqa: E731
        worker, num_workers = share
        if num_workers == 1:
            files, labels, names, skipped = scan_folder(root, strict)
            examples = Examples(len(files), keys=(np.asarray(files), labels), read=read,
                                reads_files=True).take(num_samples)
            return examples, DatasetInfo(len(names), names, examples.count, len(skipped),
                                         skipped)
        # one worker of many: it checks and reads its share of the listing alone
        files, labels, names = list_folder(root)
        files, labels = files[:num_samples or None], labels[:num_samples or None]
        mine = np.asarray(files[worker::num_workers])
        ok = readable_images(mine, strict)
        examples = Examples(int(ok.sum()), keys=(mine[ok], labels[worker::num_workers][ok]),
                            read=read, reads_files=True, owner=share)
        skipped = list(mine[~ok])
        return examples, DatasetInfo(len(names), names, len(files), len(skipped), skipped)
    if kind == "tfrecord":
        examples, names = read_tfrecord(arg)
        examples = examples.take(num_samples)
        return examples, DatasetInfo(len(names), names, examples.count)
    if kind == "tfds":
        ds, info = _load_tfds(arg, split, data_dir, num_samples)
        return Examples(info.num_examples, dataset=ds), info
    raise ValueError(f"dataset must be shapes, folder:PATH, tfrecord:GLOB or tfds:NAME, got {spec!r}")


def _load_tfds(name, split, data_dir, num_samples):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ValueError(f"tfds:{name} needs tensorflow_datasets (pip install tensorflow-datasets)"
                         ) from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    except Exception as e:  # not prepared: there is no network to download it here
        raise ValueError(
            f"TFDS dataset {name!r} ({split}) is not prepared locally: {e}. Prepare it on a "
            f"machine with the data: `tfds build {name} --data_dir=DIR` (or download_and_prepare),"
            " copy DIR here and pass data_dir / set TFDS_DATA_DIR.") from e
    info = builder.info
    label = info.features["label"]
    count = info.splits[split].num_examples
    if num_samples:
        ds, count = ds.take(num_samples), min(count, num_samples)
    return ds.map(lambda x, y: (x, y)), DatasetInfo(label.num_classes, list(label.names), count)


def _resize_eval(image, img_size, crop_pct, method):
    """timm's eval transform: resize the short side to img_size / crop_pct, centre crop."""
    import tensorflow as tf

    scale_size = int(np.floor(img_size / crop_pct))
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    ratio = scale_size / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * ratio), tf.int32)
    image = tf.image.resize(tf.cast(image, tf.float32), new, method=method, antialias=True)
    top = (new[0] - img_size) // 2
    left = (new[1] - img_size) // 2
    # the crop's offsets are data-dependent: restore the static shape models need
    return tf.ensure_shape(image[top:top + img_size, left:left + img_size],
                           (img_size, img_size, 3))


def _random_resized_crop(image, img_size, scale, method, seed):
    import tensorflow as tf

    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4]), seed=seed, area_range=scale,
        aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.0, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, size)
    return tf.image.resize(tf.cast(crop, tf.float32), (img_size, img_size), method=method,
                           antialias=True)


def write_evaluation(metrics, info, class_names, output_dir, pipe, samples):
    """Completes ``metrics`` with the image count and class names, writes metrics.json to
    ``output_dir`` (if any) and returns a batch of ``samples`` examples of ``pipe`` to draw
    (None without output_dir): what every task's evaluation writes."""
    import json

    metrics.update(count=info.num_examples, class_names=list(class_names or info.class_names))
    if not output_dir:
        return None
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return next(iter(pipe.unbatch().batch(samples)))


def denormalise(images, mean, std):
    """Normalised float images back to uint8 pixels, for pictures."""
    pixels = np.asarray(images) * np.asarray(std, np.float32) * 255 + np.asarray(
        mean, np.float32) * 255
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_pipeline(ds, *, training, img_size, batch_size, num_classes, mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225), interpolation="bicubic", crop_pct=0.875,
                  randaugment=False, mixup=0.0, cutmix=0.0, label_smoothing=0.0, seed=0,
                  shuffle_buffer=2048, drop_remainder=None, repeat=False, min_crop_scale=0.7,
                  start=0, worker=0, num_workers=1):
    """Batched (images float32 NHWC normalised, labels).

    ``ds``: Examples (``load_examples``) or a tf.data.Dataset. Training reads Examples as
    their seeded stream from position ``start`` of the share of ``worker`` of
    ``num_workers`` (keras_vit/data/stream.py: resume in constant time); a Dataset is
    shuffled with the seed and skipped to ``start`` by replay.

    Train: seeded shuffle, random-resized crop (area min_crop_scale..1; 0.7
    keeps the shapes whole enough to tell apart, use 0.08 for ImageNet-like data), flip,
    optional RandAugment, then MixUp/CutMix on batches; labels become soft
    one-hot when mixup, cutmix or label smoothing is on. Eval: resize +
    centre crop, no randomness. The pipeline is deterministic for a seed, so
    ``skip(n)`` replays exactly the batches a resumed run would have seen.
    """
    import keras
    import tensorflow as tf

    method = {"bicubic": "bicubic", "bilinear": "bilinear"}.get(interpolation, "bilinear")
    mean = tf.constant(np.asarray(mean, np.float32) * 255.0)
    std = tf.constant(np.asarray(std, np.float32) * 255.0)
    drop_remainder = training if drop_remainder is None else drop_remainder
    soft = training and bool(mixup or cutmix or label_smoothing)

    if training:
        ds = training_elements(ds, seed=seed, shuffle_buffer=shuffle_buffer, repeat=repeat,
                               start=start, worker=worker, num_workers=num_workers)
        rand_aug = keras.layers.RandAugment(value_range=(0, 255), seed=seed) if randaugment else None

        def augment(i, item):
            image, label = item
            s = tf.stack([tf.cast(seed, tf.int64), i])
            image = _random_resized_crop(image, img_size, (min_crop_scale, 1.0), method, s)
            flip = tf.random.stateless_uniform([], tf.cast(s + 1, tf.int64)) < 0.5
            image = tf.where(flip, tf.image.flip_left_right(image), image)
            # the crop's size is data-dependent: restore the static shape later layers need
            image = tf.ensure_shape(image, (img_size, img_size, 3))
            return tf.clip_by_value(image, 0, 255), label

        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if rand_aug is not None:
            ds = ds.map(lambda x, y: (rand_aug(x), y), num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
    else:
        ds = ds.as_dataset() if isinstance(ds, Examples) else ds
        ds = ds.map(lambda x, y: (tf.clip_by_value(_resize_eval(x, img_size, crop_pct, method), 0,
                                                   255), y),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if repeat:
            ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    def finish(x, y):
        x = (x - mean) / std
        y = tf.cast(y, tf.int32)
        if soft:
            y = tf.one_hot(y, num_classes)
            if label_smoothing:
                y = y * (1 - label_smoothing) + label_smoothing / num_classes
        return x, y

    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if training and (mixup or cutmix):
        mix = [keras.layers.MixUp(alpha=mixup, seed=seed)] if mixup else []
        mix += [keras.layers.CutMix(factor=cutmix, seed=seed)] if cutmix else []

        def mix_batch(x, y):
            for layer in mix:
                out = layer({"images": x, "labels": y}, training=True)
                x, y = out["images"], out["labels"]
            return x, y

        ds = ds.map(mix_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


__all__ = ["DatasetInfo", "Examples", "load_dataset", "load_examples", "training_stream", "make_pipeline", "read_tfrecord", "scan_folder",
           "seeded_shuffle", "shapes", "write_tfrecord", "denormalise", "write_evaluation"]
