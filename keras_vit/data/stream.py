"""The training order as a function of the position, so that a run resumes without replaying
its data and each worker reads only its share.

Example k of epoch e of a worker's share is ``index_shuffle(k)`` under a seed made of
(seed, worker, epoch): a stateless permutation evaluated per example, never materialised.
Resuming at step s therefore starts the stream at position s * batch without reading or
decoding anything before it: constant time, whatever the step. TFRecord shards cannot be
read at an index, so there the order is shuffled at two levels that can both be skipped
without decoding: the shards of each epoch (a seeded order, read in groups of ``cycle``
interleaved shards) and windows of ``window`` records inside a group (a seeded
permutation each); a resume skips whole groups by their record counts and reads at most
one group's raw records to reach its position.

Workers: with W input pipelines (workers, or TPU hosts), worker w owns the examples (or
TFRecord shards) w, w + W, w + 2W, ... of the split, for the whole run; it never opens the
others. Every element carries a unique id, position * W + w, which seeds its augmentation.
"""

import dataclasses

import numpy as np

_INT64_MAX = 2**63 - 1


@dataclasses.dataclass
class Examples:
    """One split that the training stream can address. Either random access: ``keys``
    (arrays whose first axis indexes the examples: in-memory images, file names, boxes) and
    ``read`` (one example's keys -> the example; None: the keys are the example), or
    ``shards``: TFRecord files [(path, record count)] and ``parse`` (one serialised record ->
    the example), or ``dataset``: a plain tf.data.Dataset (TFDS), which resumes by replaying.
    ``reads_files``: the first key is a file path, read (tf.io.read_file) before ``read``,
    which then gets the file's bytes in its place (``cached`` holds them in memory).
    """

    count: int
    keys: tuple = None
    read: object = None
    shards: list = None
    parse: object = None
    dataset: object = None
    reads_files: bool = False
    owner: tuple = None  # (worker, num_workers) whose share alone these are (cached shards)

    def __post_init__(self):
        if sum(x is not None for x in (self.keys, self.shards, self.dataset)) != 1:
            raise ValueError("Examples holds exactly one of keys, shards or dataset")

    @property
    def random_access(self):
        return self.keys is not None

    def as_dataset(self):
        """Every example once, in the stored order (evaluation, calibration)."""
        import tensorflow as tf

        if self.dataset is not None:
            return self.dataset
        if self.shards is not None:
            files = [path for path, _ in self.shards]
            return tf.data.TFRecordDataset(files).map(
                self.parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        def read(*keys):
            return self.read_keys(keys)

        return tf.data.Dataset.from_tensor_slices(self.keys).map(
            read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def read_keys(self, keys):
        """One example from its keys (a tuple of tensors)."""
        import tensorflow as tf

        if self.reads_files:
            keys = (tf.io.read_file(keys[0]),) + tuple(keys[1:])
        return self.read(*keys) if self.read is not None else tuple(keys)

    def cached(self, worker=0, num_workers=1):
        """The same examples with their stored bytes held in memory, for data sets that fit:
        the files named by the keys are read once (decoding still happens at every use, so
        augmentations stay random), the stream's order unchanged. TFRecord shards become
        this worker's records in memory (``owner``), streamed in a full random order rather
        than by shard and window. Only this worker's share is read. Examples without files
        (in memory, TFDS) are returned as they are."""
        import tensorflow as tf

        if self.shards is not None:  # random access to this worker's records alone
            records = list(tf.data.TFRecordDataset(
                [path for path, _ in self.shards[worker::num_workers]]).as_numpy_iterator())
            return Examples(len(records), keys=(np.asarray(records, dtype=object),),
                            read=self.parse, owner=(worker, num_workers))
        if not self.reads_files:
            return self
        contents = np.empty(len(self.keys[0]), dtype=object)
        contents[:] = b""  # other workers' files: never read
        mine = range(len(contents)) if self.owner else range(worker, len(contents), num_workers)
        for i in mine:
            contents[i] = tf.io.read_file(str(self.keys[0][i])).numpy()
        return dataclasses.replace(self, keys=(contents,) + tuple(self.keys[1:]),
                                   reads_files=False)

    def share_count(self, worker=0, num_workers=1):
        """How many examples worker ``worker`` of ``num_workers`` owns."""
        if self.owner is not None:
            return self.count
        if self.shards is not None:
            return sum(count for _, count in self.shards[worker::num_workers])
        return worker_share(self.count, worker, num_workers)

    def take(self, n):
        """The first ``n`` examples (stored order) as an Examples of the same kind."""
        if n is None or n >= self.count:
            return self
        if self.keys is not None:
            return dataclasses.replace(self, count=n, keys=tuple(k[:n] for k in self.keys))
        if self.dataset is not None:
            return dataclasses.replace(self, count=n, dataset=self.dataset.take(n))
        kept, left = [], n  # whole shards, the last one cut: read as a plain dataset
        for path, count in self.shards:
            kept.append((path, min(count, left)))
            left -= kept[-1][1]
            if left == 0:
                break
        if kept[-1][1] == dict(self.shards)[kept[-1][0]]:
            return dataclasses.replace(self, count=n, shards=kept)
        return Examples(n, dataset=self.as_dataset().take(n))


def share_source(examples, cache=False):
    """``examples_for(worker, num_workers)``: the Examples a worker's stream reads; with
    ``cache`` the worker's share held in memory (``Examples.cached``), read once."""
    cached = {}

    def examples_for(worker, num_workers):
        if not cache:
            return examples
        if (worker, num_workers) not in cached:
            cached[(worker, num_workers)] = examples.cached(worker, num_workers)
        return cached[(worker, num_workers)]

    return examples_for


def worker_share(count, worker, num_workers):
    """How many of ``count`` items (examples or shards) worker ``worker`` owns: the items
    worker, worker + num_workers, ..."""
    return len(range(worker, count, num_workers))


def training_stream(examples, *, seed, start=0, worker=0, num_workers=1, window=2048,
                    cycle=8):
    """(uid int64, example) forever, from this worker's position ``start`` (examples it has
    consumed so far), in the run's seeded order; uid = position * num_workers + worker."""
    import tensorflow as tf

    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is not one of {num_workers} workers")
    if examples.dataset is not None:
        return _replayed_stream(examples.dataset, seed, start, worker, num_workers, window)
    if examples.shards is not None:
        raw = _shard_stream(examples.shards, seed, start, worker, num_workers, window, cycle)
        read = examples.parse
    else:
        if examples.owner not in (None, (worker, num_workers)):
            raise ValueError(f"these examples are worker {examples.owner[0]} of "
                             f"{examples.owner[1]}'s share, not worker {worker} of {num_workers}'s")
        raw = _indexed_stream(examples.count, seed, start, worker, num_workers,
                              whole=examples.owner is not None)
        keys = tuple(tf.convert_to_tensor(k) for k in examples.keys)

        def gather(i):
            return tuple(tf.gather(k, i) for k in keys)

        raw = raw.map(gather)
        read = examples.read_keys
    stream = tf.data.Dataset.zip(tf.data.Dataset.range(start, _INT64_MAX), raw)

    def with_uid(position, item):
        return position * num_workers + worker, read(item)

    return stream.map(with_uid, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _permutation_seed(seed, worker, epoch):
    import tensorflow as tf

    base = tf.constant([seed, worker], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))


def _indexed_stream(count, seed, start, worker, num_workers, whole=False):
    """The index (into the whole split) of the example at each position from ``start``;
    ``whole``: the examples are this worker's share already, every index is its own."""
    import tensorflow as tf

    share = count if whole else worker_share(count, worker, num_workers)
    stride, first = (1, 0) if whole else (num_workers, worker)
    if share == 0:
        raise ValueError(f"worker {worker} of {num_workers} has no examples: the split has "
                         f"only {count}")

    def locate(position):
        epoch, k = position // share, position % share
        j = tf.random.experimental.index_shuffle(
            k, tf.cast(_permutation_seed(seed, worker, epoch), tf.int64), share - 1)
        return first + stride * j

    return tf.data.Dataset.range(start, _INT64_MAX).map(locate)


def _shard_stream(shards, seed, start, worker, num_workers, window, cycle):
    """Serialised records of this worker's shards from position ``start``: per epoch the
    shards in a seeded order, ``cycle`` at a time interleaved, each window of ``window``
    records permuted; whole groups before ``start`` are skipped unread."""
    import tensorflow as tf

    mine = shards[worker::num_workers]
    if not mine:
        raise ValueError(f"{len(shards)} TFRecord shard(s) for {num_workers} workers: worker "
                         f"{worker} has none. Write at least as many shards as workers (a "
                         f"multiple of them for equal shares)")
    files = tf.constant([path for path, _ in mine])
    counts = tf.constant([count for _, count in mine], tf.int64)
    total = sum(count for _, count in mine)
    num_shards = len(mine)
    num_groups = -(-num_shards // cycle)
    first_epoch, first_offset = divmod(start, total)

    def group_records(epoch, group, group_files, skip):
        skipped_windows = skip // window
        seed_g = tf.random.experimental.stateless_fold_in(
            _permutation_seed(seed, worker, epoch), group)
        records = tf.data.Dataset.from_tensor_slices(group_files).interleave(
            tf.data.TFRecordDataset, cycle_length=cycle, block_length=1,
            num_parallel_calls=cycle, deterministic=True)
        records = records.skip(skipped_windows * window).batch(window)

        def permute(k, batch):
            noise = tf.random.stateless_uniform(
                tf.shape(batch)[:1], tf.random.experimental.stateless_fold_in(seed_g, k))
            return tf.gather(batch, tf.argsort(noise))

        records = records.enumerate(skipped_windows).map(permute).unbatch()
        return records.skip(skip - skipped_windows * window)

    def epoch_records(epoch):
        skip = tf.where(epoch == first_epoch, tf.constant(first_offset, tf.int64), 0)
        noise = tf.random.stateless_uniform([num_shards], _permutation_seed(seed, worker, epoch))
        order = tf.argsort(noise)
        epoch_files, epoch_counts = tf.gather(files, order), tf.gather(counts, order)
        group_counts = tf.math.unsorted_segment_sum(epoch_counts, tf.range(num_shards) // cycle,
                                                    num_groups)
        ends = tf.cumsum(group_counts)
        first_group = tf.reduce_sum(tf.cast(ends <= skip, tf.int64))
        before = tf.reduce_sum(tf.where(tf.range(num_groups, dtype=tf.int64) < first_group,
                                        group_counts, 0))

        def group(g):
            return group_records(epoch, g, epoch_files[g * cycle:(g + 1) * cycle],
                                 tf.where(g == first_group, skip - before, 0))

        return tf.data.Dataset.range(first_group, num_groups).flat_map(group)

    return tf.data.Dataset.range(first_epoch, _INT64_MAX).flat_map(epoch_records)


def training_elements(data, *, seed, shuffle_buffer, repeat=True, start=0, worker=0,
                      num_workers=1):
    """(uid, example) elements of a training pipeline, what every task's augmentation maps:
    the addressed stream of Examples (one pass of the share when not ``repeat``), or for a
    plain tf.data.Dataset its seeded shuffle, sharded and skipped to ``start`` by replay."""
    if not isinstance(data, Examples):
        data = Examples(None, dataset=data) if repeat else data
        if not repeat:  # one pass, as the dataset's own iterator gives it
            if num_workers > 1:
                data = data.shard(num_workers, worker)
            return seeded_shuffle(data, seed, shuffle_buffer, repeat=False).enumerate().skip(
                start)
    stream = training_stream(data, seed=seed, start=start, worker=worker,
                             num_workers=num_workers, window=shuffle_buffer)
    if repeat:
        return stream
    return stream.take(max(data.share_count(worker, num_workers) - start, 0))


def seeded_shuffle(ds, seed, shuffle_buffer, repeat):
    """A plain dataset's training order: shuffled with the seed, each pass reshuffled,
    repeated if asked. Repeated, every iterator gets a fresh shuffle state: the order of pass
    k depends on (seed, k) alone, not on what other iterators (a probe, Keras' first-batch
    peek, their read-ahead) drew before, so ``skip(n)`` replays it in a resumed process."""
    import tensorflow as tf

    if not repeat:
        return ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

    def passes(_):
        return ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()

    return tf.data.Dataset.range(1).flat_map(passes)


def _replayed_stream(ds, seed, start, worker, num_workers, shuffle_buffer):
    """A dataset without addresses (TFDS): a seeded shuffle buffer, this worker's share by
    ``shard``, and ``skip`` to resume, which replays (reads and decodes) every element before
    ``start``: time that grows with the step."""
    from absl import logging

    if start:
        logging.warning("resuming a dataset without random access (TFDS) replays its first %d "
                        "examples; write it to TFRecord shards (tools/make_tfrecords.py) to "
                        "resume in constant time", start)
    ds = ds.shard(num_workers, worker) if num_workers > 1 else ds
    ds = seeded_shuffle(ds, seed, shuffle_buffer, repeat=True)

    def with_uid(position, item):
        return position * num_workers + worker, item

    return ds.enumerate().skip(start).map(with_uid)
