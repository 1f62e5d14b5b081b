"""What clusters do to training jobs, with the apps' defaults: SIGTERM (preemption), a worker
killed and started again, truncated checkpoints, a model_dir on a non-POSIX filesystem or not
writable, and bad input that must fail before any step without touching an existing run."""

import hashlib
import json
import os
import re
import shutil
import signal
import time
import uuid

import numpy as np
import pytest

import app_process
from test_training import TINY, _free_port, checkpoint_arrays, read, run_app

ENV = dict(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
TINY_MODEL_ARGS = dict(patch_size=8, depth=1, embed_dim=32, num_heads=2)


def start_app(args, log_path, env=None):
    """apps/train.py in the background (a process forked from the tests' pre-imported server,
    tests/app_process.py, signalled and killed by its pid), stdout and stderr into
    ``log_path``."""
    return app_process.AppProcess("train.py", args, log_path,
                                  env=dict(os.environ, **ENV, **(env or {})))


def log_of(proc):
    with open(proc.log_path) as f:
        return f.read()


def wait_until(condition, procs=(), timeout=300, poll=0.2):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        for p in procs:
            assert p.poll() is None, f"exited early ({p.returncode}):\n{log_of(p)[-3000:]}"
        time.sleep(poll)


def finish(proc, timeout=600):
    proc.wait(timeout=timeout)
    return proc.returncode, log_of(proc)


def checkpoint_steps(run, sub="checkpoints"):
    from keras_vit.training.callbacks import list_checkpoints

    return [step for step, _ in list_checkpoints(os.path.join(run, sub))]


def newest_checkpoint(run, sub="checkpoints"):
    from keras_vit.training.callbacks import list_checkpoints

    return list_checkpoints(os.path.join(run, sub))[-1][1]


def files_of(directory):
    """{relative path: sha256} of every file under ``directory``."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_same_weights(path_a, path_b, atol=0.0):
    a, b = checkpoint_arrays(path_a), checkpoint_arrays(path_b)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch run: 6 steps, checkpoints of steps 4 and 6 (2 kept)."""
    run = str(tmp_path_factory.mktemp("finished") / "run")
    run_app("train.py", *TINY, "--epochs=1", "--checkpoint_every=2", f"--model_dir={run}")
    return run


@pytest.fixture
def copied_run(finished_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    return run


def test_sigterm_mid_epoch_saves_that_step_and_the_rerun_ends_like_an_uninterrupted_run(
        tmp_path):
    # 20 steps an epoch (the 6 batches repeat), 40 in all; checkpoints at the epoch ends only
    args = [*TINY, "--steps_per_epoch=20", "--epochs=2", "--checkpoint_every=1000"]
    reference = str(tmp_path / "reference")
    run_app("train.py", *args, f"--model_dir={reference}")

    run = str(tmp_path / "run")
    proc = start_app([*args, f"--model_dir={run}"], tmp_path / "first.log")
    wait_until(lambda: "step 5/40" in log_of(proc), [proc], poll=0.05)
    proc.send_signal(signal.SIGTERM)
    code, log = finish(proc)
    assert code == 143, log[-3000:]
    saved = checkpoint_steps(run)[-1]
    assert saved % 20 and 5 <= saved < 40, saved  # mid-epoch: the SIGTERM checkpoint
    assert f"SIGTERM: saved a checkpoint at step {saved}" in log
    assert not os.path.exists(os.path.join(run, "model.keras"))
    # the apps (evaluate, export) load a preempted run from its checkpoint
    from keras_vit.training.trainer import load_trained_model

    stored = list(checkpoint_arrays(newest_checkpoint(run)).values())
    model = load_trained_model(run)
    assert model.output_shape == (None, 8)
    assert all(any(w.shape == v.shape and np.array_equal(w, v) for v in stored)
               for w in model.get_weights())

    second = run_app("train.py", *args, f"--model_dir={run}")
    assert f"resuming from step {saved} of 40" in second.stderr
    assert read(f"{run}/summary.json")["steps"] == 40
    assert checkpoint_steps(run) == checkpoint_steps(reference) == [20, 40]
    assert_same_weights(newest_checkpoint(run), newest_checkpoint(reference))


def test_multi_worker_sigterm_then_a_worker_killed_and_restarted(tmp_path):
    """Two workers on 127.0.0.1. SIGTERM to one: both save the same step and exit 143. Then
    kill -9 of one worker and its restart with the same command: TensorFlow cannot rejoin a
    running collective, so the surviving worker stops with a message, the restarted one waits
    for its peer, and the rerun of the other resumes both from the last checkpoint."""
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    run = str(tmp_path / "run")
    args = [*TINY, "--train_samples=160", "--epochs=2", "--checkpoint_every=2",
            "--strategy=multi_worker_mirrored", f"--model_dir={run}"]  # 20 steps

    def worker(index, name):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        return start_app(args, tmp_path / f"{name}.log", env={"TF_CONFIG": json.dumps(config)})

    # 1. SIGTERM to worker 1 alone
    w0, w1 = worker(0, "w0-first"), worker(1, "w1-first")
    wait_until(lambda: max(checkpoint_steps(run) or [0]) >= 2, [w0, w1])
    w1.send_signal(signal.SIGTERM)
    (code0, log0), (code1, log1) = finish(w0), finish(w1)
    assert code0 == code1 == 143, (log0[-2000:], log1[-2000:])
    step = checkpoint_steps(run)[-1]
    assert f"SIGTERM: saved a checkpoint at step {step}" in log0
    assert f"SIGTERM: saved a checkpoint at step {step}" in log1
    assert 2 <= step < 20 and checkpoint_steps(run, "checkpoints_worker1")[-1] == step
    assert "XLA off" in log0  # the defaults: XLA decided off, no crash

    # 2. both again; kill -9 worker 1 mid-training and start it again at once
    w0, w1 = worker(0, "w0-second"), worker(1, "w1-second")
    wait_until(lambda: max(checkpoint_steps(run)) >= step + 2, [w0, w1])
    w1.kill()
    w1.wait()
    w1 = worker(1, "w1-restarted")
    code0, log0 = finish(w0, timeout=300)
    assert code0 == 1 and "a worker of the cluster was lost" in log0, log0[-3000:]
    assert "start every worker again with the same command" in log0
    lost_at = checkpoint_steps(run)[-1]
    assert w1.poll() is None, log_of(w1)[-3000:]  # waiting for its peer

    # 3. the other worker's rerun: both resume from the last checkpoint and finish
    w0 = worker(0, "w0-third")
    (code0, log0), (code1, log1) = finish(w0), finish(w1)
    assert code0 == code1 == 0, (log0[-3000:], log1[-3000:])
    assert f"resuming from step {lost_at} of 20" in log0
    assert read(f"{run}/summary.json")["steps"] == 20
    assert_same_weights(newest_checkpoint(run), newest_checkpoint(run, "checkpoints_worker1"),
                        atol=1e-6)


def test_truncated_newest_checkpoint_is_reported_and_the_previous_one_used(copied_run):
    run = copied_run
    assert checkpoint_steps(run) == [4, 6]  # the newest 2 (--keep_checkpoints default)
    newest = newest_checkpoint(run)
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    proc = run_app("train.py", *TINY, "--epochs=2", "--checkpoint_every=2",
                   f"--model_dir={run}")
    assert f"checkpoint {newest} is unreadable" in proc.stderr
    assert "resuming from step 4 of 12" in proc.stderr
    assert read(f"{run}/summary.json")["steps"] == 12
    assert checkpoint_steps(run) == [10, 12]


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(copied_run):
    from keras_vit.training import TrainConfig, train
    from keras_vit.training.callbacks import CheckpointError, list_checkpoints

    run = copied_run
    for _, path in list_checkpoints(os.path.join(run, "checkpoints")):
        with open(path, "r+b") as f:
            f.truncate(100)
    before = files_of(run)
    config = TrainConfig(model_args=TINY_MODEL_ARGS, img_size=32, train_samples=96,
                         val_samples=32, batch_size=16, epochs=2, model_dir=run)
    with pytest.raises(CheckpointError, match="--model_dir: no usable checkpoint in .*"
                       "ckpt-000000006.weights.h5.*ckpt-000000004.weights.h5"):
        train(config, flags_text="changed")
    assert files_of(run) == before


def test_model_dir_on_a_non_posix_filesystem():
    """Everything a run writes goes through tf.io.gfile: TensorFlow's in-memory ram://
    filesystem stands in for gs://. The second call resumes from the first's checkpoint."""
    import tensorflow as tf

    from keras_vit.training import TrainConfig, train

    run = f"ram://keras_vit_{uuid.uuid4().hex}/run"
    config = TrainConfig(model_args=TINY_MODEL_ARGS, img_size=32, train_samples=64,
                         val_samples=16, batch_size=16, epochs=1, checkpoint_every=2,
                         model_dir=run, export_dir=f"{run}/export")
    summary = train(config, flags_text="--seed=0\n")
    assert summary["steps"] == 4
    for name in ("flags.txt", "config.json", "preprocessing.json", "history.json",
                 "training_curve.png", "model.keras", "summary.json",
                 "checkpoints/ckpt-000000004.weights.h5", "export/saved_model/saved_model.pb"):
        assert tf.io.gfile.exists(f"{run}/{name}"), name
    assert tf.io.gfile.glob(f"{run}/logs/train/events.out.tfevents.*")
    assert not os.path.exists("ram:")  # nothing went to a local folder of that name

    config.epochs = 2
    assert train(config)["steps"] == 8
    assert [h["epoch"] for h in json.loads(tf.io.gfile.GFile(f"{run}/history.json").read())
            ] == [1, 2]


def test_unwritable_model_dir_fails_before_training(tmp_path):
    from keras_vit.training import TrainConfig, train

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    config = TrainConfig(model_args=TINY_MODEL_ARGS, img_size=32, train_samples=32,
                         batch_size=16, epochs=1, model_dir=str(blocker / "run"))
    with pytest.raises(ValueError, match=r"--model_dir .*a_file/run' is not writable"):
        train(config)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_model_dir_fails_before_training(tmp_path):
    from keras_vit.training import TrainConfig, train

    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    config = TrainConfig(model_args=TINY_MODEL_ARGS, img_size=32, train_samples=32,
                         batch_size=16, epochs=1, model_dir=str(read_only))
    with pytest.raises(ValueError, match="--model_dir .* is not writable"):
        train(config)


def _wrong_schema_tfrecord(path):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for label in range(4):
            example = tf.train.Example(features=tf.train.Features(feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"\x00" * 8])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}))
            writer.write(example.SerializeToString())


@pytest.mark.parametrize("change,message", [
    (dict(dataset="tfrecord:/no/such/dir/train-*.tfrecord"),
     re.escape("--dataset 'tfrecord:/no/such/dir/train-*.tfrecord': no TFRecord files match")),
    (dict(dataset="tfrecord:WRONG_SCHEMA"),
     r"--dataset 'tfrecord:.*wrong.tfrecord': Feature: image/\w+/?\w* \(data type: \w+\) is "
     "required but could not be found"),
    (dict(dataset="tfds:no_such_dataset_here"), "--dataset 'tfds:no_such_dataset_here': "),
    (dict(model_args=dict(TINY_MODEL_ARGS, no_such_arg=3)),
     r"--model_args .*no_such_arg.*: vit_tiny_patch16_224 does not take it"),
])
def test_bad_input_fails_before_any_step_and_leaves_the_run_alone(copied_run, tmp_path,
                                                                  change, message):
    from keras_vit.training import TrainConfig, train

    if change.get("dataset") == "tfrecord:WRONG_SCHEMA":
        _wrong_schema_tfrecord(tmp_path / "wrong.tfrecord")
        change = dict(dataset=f"tfrecord:{tmp_path}/wrong.tfrecord")
    before = files_of(copied_run)
    config = TrainConfig(**dict(dict(model_args=TINY_MODEL_ARGS, img_size=32, train_samples=96,
                                     val_samples=32, batch_size=16, epochs=3,
                                     model_dir=copied_run), **change))
    with pytest.raises(ValueError, match=message):
        train(config, flags_text="changed")
    assert files_of(copied_run) == before


def test_batch_not_divisible_by_replicas_leaves_the_run_alone(copied_run):
    before = files_of(copied_run)
    proc = run_app("train.py", *TINY[:-1], "--batch_size=15", "--strategy=mirrored",
                   "--cpu_replicas=2", "--epochs=3", f"--model_dir={copied_run}", check=False)
    assert proc.returncode == 2
    assert "--batch_size 15 is not divisible by the 2 replicas" in proc.stderr
    assert files_of(copied_run) == before
