"""The training journey: apps end to end, strategies, resume after SIGKILL, NaN stop, flags."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import app_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model=vit_tiny_patch16_224", '--model_args={"patch_size": 8, "depth": 1, '
        '"embed_dim": 32, "num_heads": 2}', "--img_size=32", "--train_samples=96",
        "--val_samples=32", "--batch_size=16"]  # every other flag at the apps' defaults


def run_app(app, *args, env=None, check=True, timeout=600):
    """apps/APP with ARGS in a fresh process (forked from a server that imported TensorFlow:
    tests/app_process.py)."""
    full_env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    proc = app_process.run_app(app, *args, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{app} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def read(path):
    with open(path) as f:
        return json.load(f)


def checkpoint_arrays(path):
    """Every array of a Keras .weights.h5 checkpoint (model and optimizer), by h5 path."""
    import h5py

    values = {}
    with h5py.File(path) as f:
        f.visititems(lambda n, o: values.__setitem__(n, np.asarray(o))
                     if hasattr(o, "shape") else None)
    return values


# The app's path for a bad flag (its own parsing, the trainer's checks, the data's) and the
# trainer's checks in process; an unknown model name in every app: tests/test_apps.py.
@pytest.mark.parametrize("args,message", [
    (["--dataset=folder:/no/such/dir"], "no such directory"),
    (["--model_args=[1]"], "must be a JSON object"),
    (["--learning_rate=-1"], "--learning_rate must be positive"),
])
def test_bad_flags_fail_before_any_work(tmp_path, args, message):
    proc = run_app("train.py", *TINY, f"--model_dir={tmp_path}/run", *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("change,message", [
    (dict(dataset="imagenet"), "--dataset must be"),
    (dict(model="vit_smal_patch16_224"), "closest: vit_small_patch16_224"),
    (dict(batch_size=0), "--batch_size"),
    (dict(cache_data=True), "--cache_data holds the files of folder:"),  # shapes has none
    (dict(model="detr_resnet50", dataset="folder:/x"), "--task=detection reads shapes, coco "
                                                       "or tfrecord"),
    (dict(model="detr_resnet50", dataset="coco:/no/such.json"), "no such file"),
])
def test_trainer_checks_name_the_flag(change, message):
    from keras_vit.training import TrainConfig
    from keras_vit.training.trainer import validate

    with pytest.raises(ValueError, match=re.escape(message)):
        validate(TrainConfig(**change))


def test_train_evaluate_export_end_to_end(tmp_path):
    run = str(tmp_path / "run")
    proc = run_app("train.py", *TINY, "--epochs=2", f"--model_dir={run}",
                   f"--export_dir={run}/export", "--export_tflite=fp32", "--label_smoothing=0.1",
                   "--mixup=0.2", "--cutmix=1.0")
    # op determinism (the default) keeps Keras from XLA-compiling the steps, and says so
    assert "XLA off" in proc.stderr and "op determinism" in proc.stderr
    assert "== summary ==" in proc.stdout
    summary = read(f"{run}/summary.json")
    assert summary["steps"] == summary["total_steps"] == 12
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    assert summary["tflite"]["relative_diff"] <= 1e-4
    for name in ("model.keras", "flags.txt", "training_curve.png", "history.json",
                 "export/saved_model/saved_model.pb", "export/model.tflite"):
        assert os.path.exists(os.path.join(run, name)), name
    assert len(read(f"{run}/history.json")) == 2
    assert os.listdir(os.path.join(run, "logs"))  # TensorBoard event files

    proc = run_app("evaluate.py", f"--model_path={run}", "--val_samples=32")
    metrics = read(f"{run}/metrics.json")
    assert metrics["count"] == 32 and abs(metrics["top1"] - summary["val_accuracy"]) < 1e-6
    assert metrics["top5"] >= metrics["top1"]
    assert os.path.exists(f"{run}/confusion_matrix.png") and "top-1" in proc.stdout

    proc = run_app("export.py", f"--model_path={run}", f"--export_dir={tmp_path}/exp",
                   "--dataset=shapes", "--calibration_batches=2", "--batch_size=16", check=False)
    report = read(f"{tmp_path}/exp/export_report.json")
    assert {"fp32", "fp16", "dynamic", "dynamic_mixed"} <= set(report)
    search = report["dynamic_mixed"]["mixed_precision"]["search"]
    assert search[-1]["agreement"] >= search[0]["agreement"]  # the search only adds float
    # --saved_model's default (on): test_apps turns it off to time the int8 file alone
    assert os.path.exists(f"{tmp_path}/exp/saved_model/saved_model.pb")
    assert report["fp32"]["relative_diff"] <= 1e-4 and report["fp16"]["relative_diff"] <= 1e-2
    # 12 steps leave the model at chance, its logits near ties: int8 is written only when
    # its top-1 agrees with Keras, else named as refused with exit code 2 (the others kept)
    if "int8" in report:
        assert proc.returncode == 0 and report["int8"]["top1_agreement"] >= 0.9
        assert report["int8"]["size_bytes"] < report["fp32"]["size_bytes"]
        assert "| int8 |" in proc.stdout
    else:
        assert proc.returncode == 2 and "int8: not written" in proc.stdout, proc.stderr[-2000:]
        assert "top-1 agreement with Keras is" in proc.stderr
        assert not os.path.exists(f"{tmp_path}/exp/model_int8.tflite")

    # a model_dir calibrates on its run's data; a bare registered name needs --dataset
    proc = run_app("export.py", "--model_path=vit_tiny_patch16_224", "--modes=int8",
                   f"--export_dir={tmp_path}/bare", check=False)
    assert proc.returncode != 0 and "needs calibration data" in proc.stderr


def _latest_checkpoint_step(run, sub="checkpoints"):
    from keras_vit.training.callbacks import latest_step

    return latest_step(os.path.join(run, sub))


def _latest_checkpoint(run, sub="checkpoints"):
    from keras_vit.training.callbacks import list_checkpoints

    return list_checkpoints(os.path.join(run, sub))[-1][1]


def test_sigkill_mid_epoch_resumes_from_last_step(tmp_path):
    run = str(tmp_path / "run")
    args = [*TINY, "--train_samples=160", "--epochs=3", "--checkpoint_every=2", f"--model_dir={run}"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    proc = app_process.AppProcess("train.py", args, tmp_path / "killed.log", env=env)
    deadline = time.time() + 300
    while _latest_checkpoint_step(run) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _latest_checkpoint_step(run)
    assert 4 <= killed_at < 30, killed_at  # mid-run (10 steps per epoch, 30 in all)
    second = run_app("train.py", *args)
    assert f"resuming from step {killed_at} of 30" in second.stderr
    assert read(f"{run}/summary.json")["steps"] == 30


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    proc = run_app("train.py", *TINY, "--learning_rate=1e12", "--schedule=constant",
                   "--checkpoint_every=1", "--epochs=3", f"--model_dir={run}", check=False)
    assert proc.returncode != 0
    assert "loss became NaN/Inf" in proc.stderr
    assert _latest_checkpoint_step(run) >= 1
    values = checkpoint_arrays(_latest_checkpoint(run))
    assert values and all(np.isfinite(v).all() for v in values.values() if v.dtype.kind == "f")


def test_mirrored_over_two_cpu_replicas(tmp_path):
    run = str(tmp_path / "run")
    proc = run_app("train.py", *TINY, "--strategy=mirrored", "--cpu_replicas=2", "--epochs=1",
                   f"--model_dir={run}")
    assert read(f"{run}/summary.json")["steps"] == 6
    # XLA has no CPU collectives: the app says so once and trains without it
    assert proc.stderr.count("XLA off for the train and eval steps") == 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_folder(root, per_class, size=32, classes=8, seed=0):
    """ROOT/<class>/<n>.png: random-coloured PNG images, ``per_class`` of each class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for n in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            pixels[:, :, c % 3] = 30 * c  # something per class to learn
            files.append(os.path.join(root, f"class{c}", f"{n}.png"))
            Image.fromarray(pixels).save(files[-1])
    return files


def opened_files(strace_log, under):
    """The files (not folders, which listing opens) under ``under`` that a process traced
    by strace opened."""
    with open(strace_log) as f:
        return {m.group(1) for m in re.finditer(r'openat\(AT_FDCWD, "([^"]+)"', f.read())
                if m.group(1).startswith(under + os.sep) and os.path.isfile(m.group(1))}


def test_multi_worker_mirrored_two_processes_end_identical(tmp_path):
    """Two workers on 127.0.0.1 train in lockstep on an image folder: each opens only its
    share of the training files (seen by strace: disjoint, together every file), and both
    end with the same weights."""
    import shutil

    data = str(tmp_path / "data")
    train_files = image_folder(f"{data}/train", per_class=12)  # 96 images: 6 steps of 16
    image_folder(f"{data}/validation", per_class=4, seed=1)
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    strace = shutil.which("strace")
    procs = []
    for index in range(2):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker",
                                                                       "index": index}}))
        trace = [strace, "-f", "-qq", "--seccomp-bpf", "-e", "trace=openat", "-o",
                 str(tmp_path / f"worker{index}.strace")] if strace else []
        cmd = [*trace, sys.executable, os.path.join(ROOT, "apps", "train.py"), *TINY[:3],
               "--batch_size=16", f"--dataset=folder:{data}", "--epochs=1",
               "--strategy=multi_worker_mirrored", f"--model_dir={tmp_path}/run"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    procs_err = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        procs_err.append(err)
    run = str(tmp_path / "run")
    assert "XLA off" in procs_err[0] and "XLA off" in procs_err[1]  # one line, no crash
    chief = checkpoint_arrays(_latest_checkpoint(run))
    other = checkpoint_arrays(_latest_checkpoint(run, "checkpoints_worker1"))
    assert chief.keys() == other.keys() and len(chief) > 10
    for name in chief:
        np.testing.assert_allclose(chief[name], other[name], rtol=0, atol=1e-6, err_msg=name)
    assert read(tmp_path / "run" / "summary.json")["steps"] == 6
    if strace:  # which files each worker opened, from the kernel's side
        opened = [opened_files(str(tmp_path / f"worker{i}.strace"), f"{data}/train")
                  for i in range(2)]
        assert opened[0] and opened[1] and not opened[0] & opened[1]
        assert opened[0] | opened[1] == set(train_files)
    else:
        pytest.fail("strace is not installed: the files each worker opens cannot be seen")


def test_tpu_without_tpu_is_a_clear_error():
    from keras_vit.training import get_strategy

    for tpu in ("local", None):  # a TPU VM's own chips; no name at all
        with pytest.raises(RuntimeError, match="No TPU found.*--tpu=local"):
            get_strategy("tpu", tpu=tpu)


def test_xla_is_off_on_cpus_for_models_with_depthwise_convolutions(caplog):
    """--jit_compile on a CPU: PVT v2 and XCiT (depthwise convolutions, which XLA:CPU runs
    ~17x slower) run as graphs, with the reason logged; ViT compiles as asked."""
    from tensorflow.python.framework import config  # disable_op_determinism has no tf.* name

    from families import build_smallest
    from keras_vit.training.strategy import resolve_jit_compile

    determinism = config.is_op_determinism_enabled()
    config.disable_op_determinism()
    try:
        for case in ("pvt_v2", "xcit"):
            with caplog.at_level("WARNING"):
                assert resolve_jit_compile(True, model=build_smallest(case)) is False, case
            assert "holds depthwise convolutions" in caplog.text
        caplog.clear()
        assert resolve_jit_compile(True, model=build_smallest("vit")) is True
        assert resolve_jit_compile(False, model=build_smallest("pvt_v2")) is False
        assert "XLA off" not in caplog.text
    finally:
        if determinism:
            config.enable_op_determinism()


def test_xla_is_off_on_cpus_for_models_in_bfloat16(caplog):
    """--mixed_precision=mixed_bfloat16 with --jit_compile on a CPU: XLA:CPU runs bfloat16
    without oneDNN (a ViT-S train step 0.7x the graph's), so the step runs as a graph, with
    the reason logged; the same model in float32 compiles as asked."""
    import keras
    from tensorflow.python.framework import config

    from families import build_smallest
    from keras_vit.training.strategy import resolve_jit_compile

    determinism = config.is_op_determinism_enabled()
    config.disable_op_determinism()
    try:
        keras.config.set_dtype_policy("mixed_bfloat16")
        try:
            model = build_smallest("vit")
        finally:
            keras.config.set_dtype_policy("float32")
        with caplog.at_level("WARNING"):
            assert resolve_jit_compile(True, model=model) is False
        assert "computes in bfloat16" in caplog.text
        assert resolve_jit_compile(True, model=build_smallest("vit")) is True
    finally:
        if determinism:
            config.enable_op_determinism()


def test_training_in_bfloat16_says_when_the_cpu_emulates_it(tmp_path, monkeypatch, caplog):
    """--mixed_precision=mixed_bfloat16 on a CPU without AVX-512 BF16 or AMX (its flags
    patched to an AVX2 CPU's) trains, and logs that bfloat16 is emulated there; the
    policy holds for the run only (an in-process caller's next model is float32 again)."""
    from keras_vit import measure
    from keras_vit.training import TrainConfig, train

    monkeypatch.setattr(measure, "cpu_flags", lambda: ["avx2", "fma"])
    config = TrainConfig(model="vit_tiny_patch16_224",
                         model_args=dict(patch_size=8, depth=1, embed_dim=32, num_heads=2),
                         img_size=32, train_samples=32, val_samples=16, batch_size=16, epochs=1,
                         mixed_precision="mixed_bfloat16", model_dir=str(tmp_path / "run"))
    try:
        with caplog.at_level("WARNING"):
            summary = train(config)
        assert keras.config.dtype_policy().name == "float32"
    finally:
        keras.config.set_dtype_policy("float32")  # whatever happened, not for the next tests
    assert summary["steps"] == 2 and 0 <= summary["val_accuracy"] <= 1
    assert "bfloat16 on this CPU is emulated" in caplog.text


def test_deit_distillation_trains_both_heads(tmp_path):
    from keras_vit.training import TrainConfig, train

    config = TrainConfig(model="deit_tiny_distilled_patch16_224",
                         model_args=dict(patch_size=8, depth=1, embed_dim=32, num_heads=2),
                         img_size=32, train_samples=64, val_samples=32, batch_size=16, epochs=1,
                         teacher="vit_tiny_patch16_224", distillation="soft",
                         model_dir=str(tmp_path / "run"))
    summary = train(config)
    assert summary["steps"] == 4 and "val_accuracy" in summary
    model = keras.saving.load_model(str(tmp_path / "run" / "model.keras"))
    assert len(model.outputs) == 1  # deployable: the two heads averaged


def test_nodeterministic_compiles_the_steps_with_xla(tmp_path):
    """--nodeterministic trades bit-identical reruns for XLA's speed (the default run's "XLA
    off" line: test_train_evaluate_export_end_to_end)."""
    fast = run_app("train.py", *TINY, "--epochs=1", "--train_samples=32", "--nodeterministic",
                   f"--model_dir={tmp_path}/fast")
    assert "XLA off" not in fast.stderr
    assert read(os.path.join(tmp_path, "fast", "summary.json"))["steps"] == 2


def config_from_flagfile(path):
    """A TrainConfig from a flags file of apps/train.py, in process (no TF app launch): every
    line a flag the app defines, each value of its field's type."""
    import dataclasses

    from keras_vit.training import TrainConfig

    with open(path) as f:
        source = f.read()
    with open(os.path.join(ROOT, "apps", "train.py")) as f:
        defined = set(re.findall(r'flags\.DEFINE_\w+\("(\w+)"', f.read()))
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    values = {}
    for line in source.splitlines():
        if not line.startswith("--"):
            continue
        name, _, value = line[2:].partition("=")
        if not value and name.startswith("no") and name[2:] in defined:
            name, value = name[2:], "false"
        assert name in defined, f"{path}: --{name} is not a flag of apps/train.py"
        if name not in types:
            continue  # a flag of the app alone (e.g. --cpu_replicas)
        kind = types[name]
        if name == "model_args":
            values[name] = json.loads(value)
        elif kind is bool:
            values[name] = value.lower() in ("", "true", "1")  # a bare --flag is true
        elif kind is tuple:
            values[name] = tuple(float(v) for v in value.split(","))
        else:
            values[name] = kind(value)
    return TrainConfig(**values)


# The edge models (scripts/edge_models.sh) claim the size of the reference they stand for.
SIZE_OF = {"edge_deit_s.flags": "deit_small_patch16_224",
           "edge_swin_t.flags": "swin_tiny_patch4_window7_224"}


@pytest.mark.parametrize("flagfile", ["deformable_detr_shapes.flags", "segformer_shapes.flags",
                                      *SIZE_OF])
def test_readme_flag_files_validate_and_build(flagfile):
    """The README's detection and segmentation runs and the edge models (configs/*.flags)
    name flags the app defines, pass its checks, and build their model at the run's size;
    an edge model has its reference's parameter count within 2% at the same number of
    classes (ViT_C's stem against DeiT-S's patch embedding, Swin's smaller relative position
    tables at 4x4 windows are what differ)."""
    import keras_vit
    from keras_vit.training.trainer import validate

    config = config_from_flagfile(os.path.join(ROOT, "configs", flagfile))
    validate(config)
    model = keras_vit.create_model(config.model, num_classes=9, img_size=config.img_size,
                                   **config.model_args)
    assert model.count_params() > 0
    if flagfile in SIZE_OF:
        from helpers import create_model_without_weights
        from keras_vit.models.common import count_parameters

        reference = create_model_without_weights(SIZE_OF[flagfile], num_classes=9)
        ratio = count_parameters(model) / count_parameters(reference)
        print(f"{flagfile}: {count_parameters(model):,} parameters, {ratio:.4f}x "
              f"{SIZE_OF[flagfile]}'s")
        assert abs(ratio - 1) <= 0.02  # measured: DeiT-S-size 0.990, Swin-T-size 0.999
