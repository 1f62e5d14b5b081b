"""The training order as a function of the position (keras_vit/data/stream.py): every epoch a
permutation, a stream started at a position continues the uninterrupted one exactly, the
workers' shares are disjoint and complete, and a resume at step 100,000 reads nothing before
its position."""

import os
import time

import numpy as np
import pytest
import tensorflow as tf

from keras_vit.data import Examples, load_examples, make_pipeline, training_stream, write_tfrecord
from test_training import image_folder


def labels_of(stream, n):
    return [int(item[1][-1]) for item in stream.take(n)]


def shard_examples(tmp_path, counts):
    """TFRecord shards of ``counts`` records each, a record being b"<shard>-<index>"."""
    shards = []
    for s, n in enumerate(counts):
        path = str(tmp_path / f"r-{s}")
        with tf.io.TFRecordWriter(path) as writer:
            for i in range(n):
                writer.write(f"{s}-{i}".encode())
        shards.append((path, n))
    return Examples(sum(counts), shards=shards, parse=lambda raw: (raw,))


def records_of(stream, n):
    return [item[1][0].numpy().decode() for item in stream.take(n)]


def test_keyed_stream_permutes_every_epoch_and_resumes_exactly():
    n = 13
    examples = Examples(n, keys=(np.arange(n) * 10, np.arange(n)))
    order = labels_of(training_stream(examples, seed=5), 4 * n)
    for epoch in range(4):
        assert sorted(order[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert order[:n] != order[n:2 * n]  # reshuffled each epoch
    for start in (1, 12, 13, 30):
        assert labels_of(training_stream(examples, seed=5, start=start), 10) == \
            order[start:start + 10]
    assert labels_of(training_stream(examples, seed=6), n) != order[:n]  # the seed matters
    uids = [int(item[0]) for item in training_stream(examples, seed=5, start=7).take(3)]
    assert uids == [7, 8, 9]


@pytest.mark.parametrize("cycle,window", [(2, 4), (8, 2048), (1, 3)])
def test_shard_stream_covers_every_record_each_epoch_and_resumes_exactly(tmp_path, cycle,
                                                                         window):
    counts = [5, 7, 3, 9, 4]
    examples = shard_examples(tmp_path, counts)
    everything = sorted(f"{s}-{i}" for s, n in enumerate(counts) for i in range(n))
    order = records_of(training_stream(examples, seed=1, cycle=cycle, window=window), 3 * 28)
    for epoch in range(3):
        assert sorted(order[epoch * 28:(epoch + 1) * 28]) == everything
    for start in (1, 4, 13, 27, 28, 45, 60):
        resumed = training_stream(examples, seed=1, start=start, cycle=cycle, window=window)
        assert records_of(resumed, 10) == order[start:start + 10], start


@pytest.mark.parametrize("kind", ["keys", "shards"])
def test_worker_shares_are_disjoint_and_complete(tmp_path, kind):
    counts = [4, 4, 3, 5, 2]  # 5 shards on 2 workers: unequal shares
    if kind == "keys":
        examples = Examples(18, keys=(np.array([f"k{i}" for i in range(18)]),))
        read = lambda s, n: [item[1][0].numpy().decode() for item in s.take(n)]  # noqa: E731
    else:
        examples = shard_examples(tmp_path, counts)
        read = records_of
    seen = []
    for worker in range(2):
        share = examples.share_count(worker, 2)
        stream = training_stream(examples, seed=0, worker=worker, num_workers=2)
        epochs = read(stream, 2 * share)
        assert sorted(epochs[:share]) == sorted(epochs[share:])  # the same share each epoch
        assert len(set(epochs[:share])) == share
        seen.append(set(epochs[:share]))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == examples.count
    if kind == "shards":  # whole shards: worker 0 owns shards 0, 2, 4
        assert {r.split("-")[0] for r in seen[0]} == {"0", "2", "4"}


def test_too_few_shards_for_the_workers_is_a_clear_error(tmp_path):
    examples = shard_examples(tmp_path, [3, 3])
    with pytest.raises(ValueError, match="2 TFRecord shard.*3 workers.*worker 2 has none"):
        training_stream(examples, seed=0, worker=2, num_workers=3)


def test_resume_at_step_100000_reads_only_from_its_position(tmp_path):
    """A folder data set resumed at step 100,000 (batch 8): its first batch arrives at once
    and no file before the position is read: the cost does not grow with the step."""
    root = str(tmp_path / "images")
    image_folder(root, per_class=4, classes=4, size=24)
    examples, _ = load_examples(f"folder:{root}")
    reads = []

    def counted_read(data, label):
        tf.py_function(lambda: reads.append(1) or 0, [], tf.int64)  # one per decoded file
        return examples.read(data, label)

    counted = Examples(examples.count, keys=examples.keys, read=lambda d, y: counted_read(d, y),
                       reads_files=True)
    pipe = dict(training=True, img_size=16, batch_size=8, num_classes=4, seed=3, repeat=True)
    step = 100_000
    began = time.perf_counter()
    resumed = next(iter(make_pipeline(counted, start=step * 8, **pipe)))
    seconds = time.perf_counter() - began
    assert seconds < 10, seconds
    assert len(reads) <= 8 * 8, len(reads)  # a batch and what AUTOTUNE read ahead, not 800,000
    # ... and it is the batch the uninterrupted run has at that step: positions are absolute,
    # as one epoch (16 images) earlier, 50,000 epochs earlier, the same permutation's place
    plain = make_pipeline(examples, start=0, **pipe)
    epoch_len = examples.count // 8  # 2 batches an epoch, no partial batches across epochs
    assert epoch_len == 2
    direct = make_pipeline(examples, start=step * 8, **pipe)
    np.testing.assert_array_equal(next(iter(direct))[0], resumed[0])
    # the stream at 8 * s equals batch s of the uninterrupted stream, for small s
    batches = [np.asarray(b[0]) for b in plain.take(5)]
    for s in (1, 3, 4):
        np.testing.assert_array_equal(
            next(iter(make_pipeline(examples, start=8 * s, **pipe)))[0], batches[s])


def test_cached_examples_give_the_same_batches(tmp_path):
    root = str(tmp_path / "images")
    image_folder(root, per_class=3, classes=3, size=20)
    examples, _ = load_examples(f"folder:{root}")
    pipe = dict(training=True, img_size=16, batch_size=3, num_classes=3, seed=1, repeat=True)
    for worker in range(2):
        cached = examples.cached(worker, 2)
        assert sum(len(c) > 0 for c in cached.keys[0]) == examples.share_count(worker, 2)
        a = [np.asarray(b[0]) for b in make_pipeline(examples, worker=worker, num_workers=2,
                                                     **pipe).take(3)]
        b = [np.asarray(b[0]) for b in make_pipeline(cached, worker=worker, num_workers=2,
                                                     **pipe).take(3)]
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    # TFRecord shards: the worker's records in memory, every one once an epoch
    write_tfrecord(root, str(tmp_path / "rec" / "train"), shards=3)
    records, _ = load_examples(f"tfrecord:{tmp_path}/rec/train-*")
    for worker in range(2):
        mine = records.cached(worker, 2)
        assert mine.count == records.share_count(worker, 2)
        labels = [int(item[1][1]) for item in training_stream(
            mine, seed=0, worker=worker, num_workers=2).take(mine.count)]
        assert len(labels) == mine.count
        with pytest.raises(ValueError, match="share"):
            training_stream(mine, seed=0, worker=1 - worker, num_workers=2)
    assert os.path.exists(str(tmp_path / "rec" / "train.index.json"))


def test_the_trainer_resumes_at_step_100001_as_fast_as_it_starts(tmp_path):
    """A run on an image folder, its checkpoint moved to step 100,001 (mid-epoch: 2 steps an
    epoch), is resumed: the trainer starts the data at that position, trains the one step
    left and takes no longer than the fresh run (a replay would decode 800,000 images)."""
    import h5py

    from keras_vit.training import callbacks as cb
    from keras_vit.training.trainer import TrainConfig, train

    root = str(tmp_path / "images")
    image_folder(root, per_class=4, classes=4, size=24)  # 16 images: 2 steps of 8 an epoch
    run = str(tmp_path / "run")
    config = dict(model="vit_tiny_patch16_224", img_size=16, dataset=f"folder:{root}",
                  model_args={"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
                  batch_size=8, checkpoint_every=1, model_dir=run)
    began = time.perf_counter()
    assert train(TrainConfig(**config, epochs=1))["steps"] == 2
    fresh = time.perf_counter() - began
    ckpt_dir = cb.checkpoint_dir(run)
    for step, path in cb.list_checkpoints(ckpt_dir)[:-1]:
        os.remove(path)
    moved = cb.checkpoint_path(ckpt_dir, 100_001)
    os.rename(cb.list_checkpoints(ckpt_dir)[-1][1], moved)
    with h5py.File(moved, "r+") as f:
        f["optimizer/vars/0"][()] = 100_001  # the optimizer's step counter
    began = time.perf_counter()
    summary = train(TrainConfig(**config, epochs=50_001))
    resumed = time.perf_counter() - began
    assert summary["steps"] == summary["total_steps"] == 100_002
    assert resumed < fresh + 10, (resumed, fresh)
