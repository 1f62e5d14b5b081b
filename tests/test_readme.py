"""The README's commands and Python snippets, run as written in fresh processes.

The main job's command runs in bash as typed; the other `python apps/APP.py FLAGS` commands
run as forks of the tests' pre-imported server (tests/app_process.py): a fresh process with
the command's argv, without TensorFlow's import each time.

They run in a scratch directory laid out like the repository root (apps/, configs/, .venv
linked), with what the README assumes already there: `runs/main_job`, a run of the main
job's flags made small the way the README's quick start says (flags after main_job.sh go to
apps/train.py), and the checkpoint file the Python API snippet names. `python` is the
project's interpreter.

Not run here, each for its reason: the two newcomer commands themselves (`bash
scripts/main_job.sh`, the full 10-minute job: tests/test_training.py runs its flagfile at
reduced size; `bash scripts/test.sh`, this suite), the training examples that need ImageNet,
several GPUs, a cluster or a TPU (tests/test_training.py runs the strategies), the
Pretrained weights snippet (it downloads from the Hugging Face Hub; tests/test_pretrained.py
loads through a local hub cache), the benchmark command (it needs an interpreter with
torch and timm) and the compress command (five methods, each fine-tuned 250 steps: minutes;
tests/test_compress_app.py runs the app on a small model).
"""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

import app_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# The quick start's way to make the main job small: flags after it go to apps/train.py.
SMALL_MAIN_JOB = ["--train_samples=256", "--val_samples=64", "--epochs=2",
                  "--export_tflite=none", "--export_dir="]


def readme_blocks(language):
    with open(README) as f:
        text = f.read()
    return [m.group(1) for m in re.finditer(rf"```{language}\n(.*?)```", text, re.S)]


def block_containing(language, needle):
    blocks = [b for b in readme_blocks(language) if needle in "\n" + b]
    assert len(blocks) == 1, f"{len(blocks)} README {language} blocks contain {needle!r}"
    return blocks[0]


def commands(block):
    """The block's commands: comment lines and trailing comments dropped, backslash
    continuations joined."""
    out, current = [], ""
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        line = line.split("  #")[0].rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
        else:
            out.append((current + line).strip())
            current = ""
    return out


def env():
    e = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e["PATH"]
    e.setdefault("CUDA_VISIBLE_DEVICES", "")
    return e


def shell(command, cwd, extra_env=None, fork=True):
    """Runs a README command in CWD: a plain `python apps/APP.py FLAGS` line as a fork of the
    tests' app server (fork=True), anything else in bash."""
    words = shlex.split(command)
    plain_app = (len(words) > 1 and words[0] in ("python", ".venv/bin/python")
                 and words[1].startswith("apps/")
                 and not any(c in command for c in "|&;<>$`"))
    if fork and plain_app:
        proc = app_process.run_app(os.path.join(str(cwd), words[1]), *words[2:],
                                   env=dict(env(), **(extra_env or {})), cwd=str(cwd))
    else:
        proc = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True,
                              text=True, env=dict(env(), **(extra_env or {})), timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def python_snippet(code, cwd):
    proc = app_process.run_app(None, code=code, cwd=str(cwd), env=env())
    assert proc.returncode == 0, f"{code}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def timm_state_dict(model):
    """A timm-layout state_dict holding ``model``'s own weights: each entry's timm->Keras
    converter (transposes, reshapes) inverted by running it on an array of indices."""
    from keras_vit.convert.core import weight_entries

    state = {}
    for variable, key, convert in weight_entries(model):
        value = np.asarray(variable)
        for shape in _candidate_shapes(value.shape):
            index = np.arange(value.size, dtype=np.float32).reshape(shape)
            try:
                moved = np.asarray(convert(index))
            except Exception:  # noqa: BLE001  a converter that rejects this layout
                continue
            if moved.shape == value.shape:
                timm = np.empty(value.size, np.float32)
                timm[moved.reshape(-1).astype(np.int64)] = value.reshape(-1)
                state[key] = timm.reshape(shape)
                break
        else:
            raise AssertionError(f"no timm layout found for {key} {value.shape}")
    return state


def _candidate_shapes(shape):
    import itertools

    return [shape] + [tuple(shape[i] for i in p)
                      for p in itertools.permutations(range(len(shape))) if p != tuple(range(len(shape)))]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory like the repository root, with the README's runs/main_job in it."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("apps", "configs", ".venv"):
        os.symlink(os.path.join(ROOT, name), work / name)
    proc = shell(".venv/bin/python apps/train.py --flagfile=configs/main_job.flags "
                 + " ".join(SMALL_MAIN_JOB), cwd=work, fork=False)
    assert "== summary ==" in proc.stdout and "validation accuracy" in proc.stdout
    with open(work / "runs" / "main_job" / "summary.json") as f:
        summary = json.load(f)
    assert summary["model"] == "vit_c_1gf" and summary["steps"] == 8  # 256 images, batch 64
    assert (work / "runs" / "main_job" / "model.keras").exists()
    return work


def test_quick_start_says_how_to_make_the_main_job_small():
    with open(README) as f:
        text = f.read()
    assert "Flags after\n`main_job.sh` go to `apps/train.py`" in text
    with open(os.path.join(ROOT, "scripts", "main_job.sh")) as f:
        assert '--flagfile=configs/main_job.flags "$@"' in f.read()


def test_quick_start_follow_up_commands(workdir):
    block = block_containing("bash", "apps/visualize.py --model_path=runs/main_job     #")
    for command in commands(block):
        proc = shell(command, workdir)
        assert "top-1" in proc.stdout or "rollout overlays" in proc.stdout
    assert list((workdir / "runs" / "main_job" / "visualize").glob("*_rollout.png"))


def test_evaluate_export_visualize_commands(workdir):
    for app in ("evaluate", "export", "visualize"):
        block = block_containing("bash", f"\npython apps/{app}.py --model_path=runs/main_job")
        for command in commands(block):
            shell(command, workdir)
    assert (workdir / "runs" / "main_job" / "metrics.json").exists()
    assert (workdir / "saved_models" / "main_job" / "model_int8.tflite").exists()
    assert list((workdir / "runs" / "main_job" / "visualize").glob("*.png"))
    # The README's LiteRT snippet runs the exported file through its signature
    snippet = block_containing("python", "get_signature_runner()")
    prelude = ("import numpy as np\n"
               "batch_of_one = np.random.default_rng(0).random((1, 32, 32, 3), np.float32)\n")
    check = "\nassert probs.shape == (1, 8) and np.isfinite(probs).all(), probs\n"
    python_snippet(prelude + snippet + check, workdir)


def test_loading_a_runs_model_snippet(workdir):
    python_snippet(block_containing("python", 'keras.saving.load_model("runs/main_job/'),
                   workdir)


def test_python_api_snippet(workdir):
    import keras_vit

    snippet = block_containing("python", "keras_vit.load_timm_weights(model, state_dict)")
    # the checkpoint file the snippet reads: a timm-layout state_dict of known weights
    path = re.search(r'load_checkpoint\("([^"]+)"\)', snippet).group(1)
    source = keras_vit.create_model("deit_tiny_patch16_224", num_classes=1000)
    state = timm_state_dict(source)
    from safetensors.numpy import save_file

    save_file(state, str(workdir / path))
    check = ("\nimport numpy as np\n"
             "assert report['top1_agreement'] is None or report['top1_agreement'] >= 0.9\n"
             "np.save('loaded_head.npy', np.asarray(model.get_layer('head').kernel))\n")
    python_snippet(snippet + check, workdir)
    np.testing.assert_array_equal(np.load(workdir / "loaded_head.npy"),
                                  np.asarray(source.get_layer("head").kernel))
    assert (workdir / "saved_models" / "deit_t" / "saved_model.pb").exists()
    assert (workdir / "saved_models" / "deit_t.tflite").exists()


def test_jax_backend_command(workdir):
    with open(README) as f:
        command = re.search(r"`(KERAS_BACKEND=jax python -c .*?)`\n", f.read()).group(1)
    shell(command, workdir)
