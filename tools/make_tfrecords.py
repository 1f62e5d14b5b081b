r"""Writes a dataset as TFRecord shards and the index the readers use (docs/data.md).

    python tools/make_tfrecords.py --task=classification --input=data/flowers/train \
        --output=records/flowers_train --shards=8
    python tools/make_tfrecords.py --task=segmentation --input=ADEChallengeData2016 \
        --split=validation --reduce_zero_label --output=records/ade_val --shards=2
    python tools/make_tfrecords.py --task=detection \
        --input=coco/annotations/instances_train2017.json --output=records/coco_train --shards=64

Shards are OUTPUT-00000-of-0000N ... (one shard: OUTPUT itself), examples dealt round-robin;
OUTPUT.index.json (each shard's record count, the class names, the task) is written last, so
a run that fails leaves no index. Train with --dataset=tfrecord:GLOB, the glob printed here.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "apps"))
from common import fail, prepare_environment  # noqa: E402

prepare_environment()

from absl import app, flags  # noqa: E402

F = flags.FLAGS
flags.DEFINE_enum("task", None, ["classification", "segmentation", "detection"],
                  "The records' task.")
flags.DEFINE_string("input", None, "classification: an image folder PATH/<class>/<image>; "
                    "segmentation: a folder PATH/images/<split>, PATH/annotations/<split> "
                    "(ADE20K's layout); detection: a COCO annotations json.")
flags.DEFINE_string("split", "train", "Segmentation: the split folder to read (train, validation, "
                    "...). Classification reads the folder given, detection the json given.")
flags.DEFINE_string("output", None, "Output prefix: OUTPUT-00000-of-0000N ... and "
                    "OUTPUT.index.json.")
flags.DEFINE_integer("shards", 1, "Number of shard files. Use a multiple of the number of "
                     "training workers (input pipelines): worker w reads the shards w, w+W, ...; "
                     "fewer shards than workers cannot train, other counts give unequal shares.")
flags.DEFINE_bool("reduce_zero_label", False, "Segmentation: check the masks and name the classes "
                  "for reduce_zero_label (ADE20K: 0 is 'other'). Masks are stored raw; train "
                  "with the same --reduce_zero_label.")
flags.DEFINE_bool("strict", False, "Classification and segmentation: fail on an unreadable "
                  "image (or a bad mask) instead of skipping it.")


def check_flags():
    """Every flag error, before anything is read or written."""
    if F.task is None or not F.input or not F.output:
        fail("--task, --input and --output are required")
    if F.shards < 1:
        fail(f"--shards must be >= 1, got {F.shards}")
    if F.task == "detection":
        if not os.path.isfile(F.input):
            fail(f"--input {F.input!r}: no such COCO annotations file")
    elif not os.path.isdir(F.input):
        fail(f"--input {F.input!r}: no such folder")
    if os.path.isdir(F.output):
        fail(f"--output {F.output!r} is a folder; give a file prefix such as {F.output}/train")


def write():
    """Writes the shards and the index; returns the index's path."""
    from keras_vit.data.folder import INDEX_SUFFIX, write_tfrecord
    from keras_vit.detection.data import write_detection_tfrecord
    from keras_vit.segmentation.data import write_segmentation_tfrecord

    index = F.output + INDEX_SUFFIX
    if F.task == "classification":
        if os.path.exists(index):  # a run that fails from here on leaves no stale index
            os.remove(index)  # (the other writers remove it once their input is checked)
        write_tfrecord(F.input, F.output, shards=F.shards, strict=F.strict)
    elif F.task == "segmentation":
        write_segmentation_tfrecord(F.input, F.output, split=F.split, shards=F.shards,
                                    reduce_zero_label=F.reduce_zero_label, strict=F.strict)
    else:
        write_detection_tfrecord(F.input, F.output, shards=F.shards)
    return index


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    try:
        index_path = write()
    except (ValueError, OSError) as e:  # bad data found before or while writing
        fail(str(e))
    with open(index_path) as f:
        index = json.load(f)
    directory = os.path.dirname(F.output)
    for name, count in index["shards"].items():
        print(f"{os.path.join(directory, name)}: {count} records")
    print(f"{index_path}: {sum(index['shards'].values())} records in {len(index['shards'])} "
          f"shard(s), {len(index['class_names'])} classes, task {index['task']}")
    pattern = F.output if F.shards == 1 else f"{F.output}-?????-of-{F.shards:05d}"
    print(f"read with --dataset=tfrecord:'{pattern}'")


if __name__ == "__main__":
    app.run(main)
