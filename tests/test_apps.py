"""The apps as a user meets them: quiet logs, reproducible runs (weights, history, int8
export), evaluation and export on the run's own data, the app's own flags in flags.txt,
closest names for an unknown model, and a run's model.keras loading after `import keras_vit`."""

import glob
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import app_process
from test_training import checkpoint_arrays, read

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model=vit_tiny_patch16_224", '--model_args={"patch_size": 8, "depth": 1, '
        '"embed_dim": 32, "num_heads": 2}', "--img_size=32", "--train_samples=96",
        "--val_samples=64", "--batch_size=16", "--epochs=2", "--export_tflite=int8"]
# What TensorFlow printed at start-up before the apps quietened it, and other noise.
NOISE = ("cuInit", "Could not find cuda drivers", "oneDNN custom operations",
         "All log messages before absl::InitializeLog", "cpu_feature_guard",
         "fully_quantize", "inference_type", "`shuffle=True` was passed",
         "use_unbounded_threadpool")  # tf.data's C++ error line of a deterministic run


def user_env(**extra):
    """The environment a user's shell has: no TF_CPP_MIN_LOG_LEVEL, no CUDA_VISIBLE_DEVICES
    (tests/conftest.py sets both for the test process)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES", "KERAS_VIT_VERBOSE")}
    return dict(env, **extra)


def run(args, env=None, check=True, cwd=ROOT, fork=False):
    """python ARGS in the user's environment: a new interpreter, or with fork=True an app
    forked from the tests' pre-imported server (tests/app_process.py), which shows all but
    TensorFlow's start-up lines."""
    if fork:
        proc = app_process.run_app(args[0], *args[1:], env=env or user_env(), cwd=cwd)
    else:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              env=env or user_env(), timeout=600, cwd=cwd)
    if check and proc.returncode:
        raise AssertionError(f"{args[:2]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def app(name):
    return os.path.join(ROOT, "apps", name)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same tiny training (default flags otherwise: XLA, one device) twice, each with
    its int8 export, run as a user would (no quieting environment of our own): the first in
    a new interpreter, the second forked from the tests' server."""
    out = []
    for name in ("a", "b"):
        run_dir = str(tmp_path_factory.mktemp(name) / "run")
        proc = run([app("train.py"), *TINY, f"--model_dir={run_dir}",
                    f"--export_dir={run_dir}/export"], fork=name == "b")
        out.append((run_dir, proc))
    return out


def test_app_logs_are_quiet(two_runs):
    for _, proc in two_runs[:1]:  # the new interpreter: TensorFlow's start-up included
        log = proc.stdout + proc.stderr
        for line in NOISE:
            assert line not in log, f"{line!r} in the training log:\n{log[-4000:]}"
        assert "== summary ==" in proc.stdout
        # the learning rate in scientific notation, never rounded to 0.0000
        rates = [part.split("=")[1] for part in log.split() if part.startswith("learning_rate=")]
        assert rates and all("e" in r for r in rates), rates


def test_verbosity_brings_tensorflow_lines_back():
    quiet = run([app("evaluate.py"), "--model_path=not_a_model"], check=False)
    loud = run([app("evaluate.py"), "--model_path=not_a_model", "--verbosity=1"], check=False)
    loud_env = run([app("evaluate.py"), "--model_path=not_a_model"],
                   env=user_env(KERAS_VIT_VERBOSE="1"), check=False)
    assert not any(line in quiet.stderr for line in NOISE), quiet.stderr
    # TensorFlow's own start-up lines (a CUDA build without a GPU, oneDNN) are back
    assert any(line in loud.stderr for line in NOISE[:5]), loud.stderr
    assert any(line in loud_env.stderr for line in NOISE[:5]), loud_env.stderr


def test_same_flags_and_seed_give_identical_runs(two_runs):
    (a, _), (b, _) = two_runs
    assert read(f"{a}/history.json") == read(f"{b}/history.json")
    ckpt_a = sorted(glob.glob(f"{a}/checkpoints/*.weights.h5"))[-1]
    ckpt_b = sorted(glob.glob(f"{b}/checkpoints/*.weights.h5"))[-1]
    weights_a, weights_b = checkpoint_arrays(ckpt_a), checkpoint_arrays(ckpt_b)
    assert weights_a.keys() == weights_b.keys() and len(weights_a) > 10
    for key in weights_a:
        np.testing.assert_array_equal(weights_a[key], weights_b[key], err_msg=key)
    summary_a, summary_b = read(f"{a}/summary.json"), read(f"{b}/summary.json")
    assert summary_a["val_accuracy"] == summary_b["val_accuracy"]
    assert summary_a["tflite"]["top1_agreement"] == summary_b["tflite"]["top1_agreement"]
    with open(f"{a}/export/model_int8.tflite", "rb") as fa, \
            open(f"{b}/export/model_int8.tflite", "rb") as fb:
        assert fa.read() == fb.read()


def test_evaluate_and_export_default_to_the_runs_data(two_runs, tmp_path):
    run_dir = two_runs[0][0]
    summary = read(f"{run_dir}/summary.json")
    proc = run([app("evaluate.py"), f"--model_path={run_dir}"], fork=True)
    metrics = read(f"{run_dir}/metrics.json")
    assert metrics["count"] == 64 and metrics["top1"] == summary["val_accuracy"]
    assert "from the training run's flags.txt" in proc.stdout
    # the same int8 file as the training app's: the same calibration images, in order
    run([app("export.py"), f"--model_path={run_dir}", f"--export_dir={tmp_path}/exp",
         "--modes=int8", "--nosaved_model"], fork=True)
    report = read(f"{tmp_path}/exp/export_report.json")
    assert report["int8"]["top1_agreement"] == summary["tflite"]["top1_agreement"]
    assert report["int8"]["latency_ms"] > 0 and "recommended" in report
    with open(f"{tmp_path}/exp/model_int8.tflite", "rb") as fa, \
            open(f"{run_dir}/export/model_int8.tflite", "rb") as fb:
        assert fa.read() == fb.read()


def test_evaluate_in_bfloat16_reports_its_agreement_with_float32(two_runs, tmp_path):
    run_dir = two_runs[0][0]
    summary = read(f"{run_dir}/summary.json")
    proc = run([app("evaluate.py"), f"--model_path={run_dir}", "--precision=bfloat16",
                f"--output_dir={tmp_path}"], fork=True)
    metrics = read(f"{tmp_path}/metrics.json")
    agreement = metrics["top1_agreement_with_float32"]
    assert metrics["precision"] == "bfloat16" and metrics["count"] == 64
    assert f"top-1 agreement of bfloat16 with float32: {100 * agreement:.2f}%" in proc.stdout
    assert agreement >= 0.9
    # accuracy can differ from float32's by the images whose class changed, no more
    assert abs(metrics["top1"] - summary["val_accuracy"]) <= 1 - agreement + 1e-9


def test_flags_txt_holds_the_apps_own_flags(two_runs):
    run_dir = two_runs[0][0]
    with open(f"{run_dir}/flags.txt") as f:
        lines = f.read().splitlines()
    names = {line[2:].split("=")[0] for line in lines}
    names = {n[2:] if n.startswith("no") and n[2:] in names | {"randaugment", "strict_data",
                                                             "jit_compile"} else n
             for n in names}
    for own in ("model", "model_args", "img_size", "epochs", "seed", "model_dir"):
        assert own in names
    for foreign in ("verbosity", "logtostderr", "flagfile", "alsologtostderr", "only_check_args",
                    "pdb_post_mortem", "run_with_profiling", "use_cprofile_for_profiling"):
        assert foreign not in names, foreign
    assert len(lines) < 40
    # the file reproduces the run
    assert f"--model_dir={run_dir}" in lines and "--epochs=2" in lines


# train.py checks its --model in the trainer; evaluate, export, visualize, compress and
# benchmark all resolve theirs with apps/common.py load_model (one --model_path app, and
# benchmark's --model, stand for them: each app run costs a TensorFlow start-up).
@pytest.mark.parametrize("app_name,flag", [("train.py", "--model"), ("evaluate.py", "--model_path"),
                                           ("benchmark.py", "--model")])
def test_unknown_model_names_the_closest(app_name, flag, tmp_path):
    proc = run([app(app_name), f"{flag}=not_a_model", f"--model_dir={tmp_path}/run"]
               if app_name == "train.py" else [app(app_name), f"{flag}=not_a_model"],
               check=False, fork=True)
    assert proc.returncode != 0
    assert "'not_a_model'" in proc.stderr and "closest: " in proc.stderr, proc.stderr[-2000:]
    closest = proc.stderr.split("closest: ")[1].split("\n")[0]
    assert len(closest.split(", ")) >= 3


def test_run_model_loads_after_import_keras_vit_alone(two_runs):
    run_dir = two_runs[0][0]
    code = ("import keras, keras_vit, numpy as np\n"
            f"m = keras.saving.load_model({run_dir + '/model.keras'!r})\n"
            "print(type(m.optimizer._learning_rate).__name__, m(np.zeros((1, 32, 32, 3))).shape)\n")
    proc = run(["-c", code])
    assert "WarmupSchedule (1, 8)" in proc.stdout


def test_verbose_request_parsing():
    spec = importlib.util.spec_from_file_location("keras_vit_apps_common", app("common.py"))
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    old = os.environ.pop("KERAS_VIT_VERBOSE", None)
    try:
        assert common.verbose_requested(["--verbosity=1"])
        assert common.verbose_requested(["-v", "2"])
        assert common.verbose_requested(["--model=x", "--v=1"])
        assert not common.verbose_requested(["--verbosity=0"])
        assert not common.verbose_requested(["--model=vit", "--img_size=32"])
    finally:
        if old is not None:
            os.environ["KERAS_VIT_VERBOSE"] = old
    line = "E0000 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)"
    assert common._is_noise(line, gpu_driver=False)
    assert not common._is_noise(line, gpu_driver=True)  # a real GPU's failure is shown
    assert not common._is_noise("E1202 some_op.cc:12] a real error", gpu_driver=False)
