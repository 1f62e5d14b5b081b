"""Shared set-up of the apps: oneDNN on before TensorFlow loads, quiet logs, flag errors, and
the one way an app turns a flag into a model."""

import json
import os


# TensorFlow's start-up lines that say nothing about this run: a CUDA build probing for a
# GPU on a machine without one, the oneDNN and CPU-instruction notices, absl's pre-init note.
_NOISE = ("Could not find cuda drivers", "failed call to cuInit", "oneDNN custom operations",
          "All log messages before absl::InitializeLog", "cpu_feature_guard",
          "To enable the following instructions", "Unable to register cu",
          "computation placer already registered", "TF-TRT Warning")
# Lines TensorFlow's C++ runtime logs at ERROR level during a run that report nothing wrong:
# tf.data's graph rewrite under op determinism names an attribute its op registry lacks.
_RUN_NOISE = ("NodeDef mentions attribute use_unbounded_threadpool",)
VERBOSE_ENV = "KERAS_VIT_VERBOSE"


def verbose_requested(argv=None):
    """True when the user asked for TensorFlow's own log lines: KERAS_VIT_VERBOSE=1, or absl's
    --verbosity (-v) of 1 or more on the command line."""
    import sys

    if os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0"):
        return True
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        for name in ("--verbosity", "-verbosity", "--v", "-v"):
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg[len(name) + 1:]
            else:
                continue
            try:
                return int(value) >= 1
            except ValueError:
                return False
    return False


def _has_nvidia_driver():
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia/version"))


def _is_noise(line, gpu_driver):
    if gpu_driver and ("cuInit" in line or "cuda drivers" in line):
        return False  # a machine with a GPU driver that fails: the user must see it
    return any(pattern in line for pattern in _NOISE)


def prepare_environment(argv=None):
    """Before TensorFlow is imported: oneDNN on, the TF backend, and quiet logs.

    TensorFlow is then imported (and its GPUs listed) with stderr captured; the lines that
    only report a missing GPU driver, the oneDNN/CPU notices and absl's pre-init note are
    dropped, everything else is passed on. A machine with an NVIDIA driver keeps its CUDA
    errors, and its GPUs are used as before. --verbosity=1 (-v 1) or KERAS_VIT_VERBOSE=1
    keeps every TensorFlow line (C++ INFO logs included)."""
    # oneDNN doubles CPU matmul throughput on CPUs where TF leaves it off (DESIGN.md); the
    # user's own setting wins. Must happen before TensorFlow is imported.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):  # the user's own level wins
        # C++ INFO and WARNING lines off once TensorFlow has started; errors stay.
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose_requested(argv) else "2"
    if verbose_requested(argv):
        return
    _import_tensorflow_quietly()
    _filter_run_stderr()


def _filter_run_stderr():
    """Routes the rest of the run's stderr (fd 2: Python's and TensorFlow's C++ logs) through
    a small child process that drops the _RUN_NOISE lines and passes every other line on.
    A child, not a thread, so that nothing is lost when the app exits or is killed: it reads
    to the end of the pipe after the app is gone."""
    import subprocess
    import sys

    sys.stderr.flush()
    code = ("import sys\n"
            f"noise = {_RUN_NOISE!r}\n"
            "for line in sys.stdin.buffer:\n"
            "    if not any(n.encode() in line for n in noise):\n"
            "        sys.stdout.buffer.write(line)\n"
            "        sys.stdout.buffer.flush()\n")
    read_end, write_end = os.pipe()
    try:
        subprocess.Popen([sys.executable, "-c", code], stdin=read_end, stdout=2, close_fds=True,
                         start_new_session=True)  # outlives a SIGTERM/SIGKILL of the app's group
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return  # no filter: the lines pass unfiltered
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)


# Optional packages TensorFlow imports when they are installed and an app never uses from
# there: jax (tf.lite's util keeps jax.jit for converting JAX functions) and
# matplotlib.pyplot (Keras' image-gallery helpers). 0.5 s and 0.7 s of every app start here;
# hidden while TensorFlow loads (both take the ImportError path), importable afterwards.
_UNNEEDED_AT_IMPORT = ("jax", "matplotlib.pyplot")


class _hidden_modules:
    def __init__(self, names):
        import sys

        self.names = [n for n in names if n not in sys.modules]

    def __enter__(self):
        import sys

        for name in self.names:
            sys.modules[name] = None  # "import name" raises ImportError

    def __exit__(self, *exc):
        import sys

        for name in self.names:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def _import_tensorflow_quietly():
    import sys
    import tempfile

    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            with _hidden_modules(_UNNEEDED_AT_IMPORT):
                import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # CUDA's initialisation logs come here
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            gpu_driver = _has_nvidia_driver()
            kept = "".join(line for line in lines if not _is_noise(line, gpu_driver))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def app_flags_text():
    """The running app's own flags as a flagfile ("--name=value" lines, sorted): what
    flags.txt holds, without absl's and TensorFlow's ~30 flags (FLAGS.flags_into_string()
    writes them all). Flags left at None are omitted; --flagfile reproduces the run."""
    import sys

    from absl import flags

    values = flags.FLAGS
    own = values.get_flags_for_module(sys.argv[0]) or values.get_flags_for_module("__main__")
    lines = [flag.serialize() for flag in sorted(own, key=lambda f: f.name)]
    return "".join(line + "\n" for line in lines if line)


def fail(message):
    """Prints a flag/usage error and exits non-zero, before any work."""
    import sys

    from absl import logging

    logging.error(message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_model_args(text):
    """--model_args (builder overrides) as a dict; a flag error unless it is a JSON object."""
    try:
        model_args = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"--model_args is not valid JSON: {e}")
    if not isinstance(model_args, dict):
        fail("--model_args must be a JSON object")
    return model_args


def model_dir_of(path):
    """The folder a trained model's files sit in: the model_dir, or the .keras file's folder."""
    import tensorflow as tf

    if tf.io.gfile.isdir(path):
        return path
    return os.path.dirname(path if "://" in path else os.path.abspath(path))


def _read_run_file(path, name):
    """The text of ``name`` next to the model at ``path`` (any filesystem TF reads), or None."""
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return None
    file = os.path.join(model_dir_of(path), name)
    if not tf.io.gfile.exists(file):
        return None
    with tf.io.gfile.GFile(file) as f:
        return f.read()


def read_preprocessing(path):
    """The training run's preprocessing.json next to the model at ``path`` (image size,
    mean/std, crop, interpolation, class names), or {} when it has none (or is a name)."""
    text = _read_run_file(path, "preprocessing.json")
    return json.loads(text) if text else {}


def read_run_flags(path):
    """The flags the training run of the model at ``path`` was started with (its flags.txt:
    "--name=value", "--name" / "--noname" lines) as {name: value string or bool}; {} when
    the model is not a training run's."""
    text = _read_run_file(path, "flags.txt") or ""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("--"):
            continue
        name, sep, value = line[2:].partition("=")
        if sep:
            values[name] = value
        elif name.startswith("no"):
            values[name[2:]] = False
        else:
            values[name] = True
    return values


def run_data_settings(path):
    """The validation data of the training run of the model at ``path``: dataset,
    val_samples, seed and img_size as the run used them (flags.txt, then the image size of
    its preprocessing.json), so evaluation and calibration read the images the run
    validated on. Missing entries are absent; {} for a model that is not a run's."""
    run = read_run_flags(path)
    settings = {}
    if "dataset" in run:
        settings["dataset"] = run["dataset"]
    for name in ("val_samples", "seed", "img_size"):
        if name in run and run[name] not in ("", "None"):
            settings[name] = int(run[name])
    if "img_size" in read_preprocessing(path):
        settings["img_size"] = int(read_preprocessing(path)["img_size"])
    return settings


def load_model(spec, flag="--model_path", img_size=None, model_args=None):
    """The model a flag names, or a flag error: a .keras file; a training model_dir (its
    model.keras, else the model rebuilt with its last checkpoint); or a registered name,
    built at ``img_size`` (default: its own) with the builder overrides ``model_args``."""
    from keras_vit.registry import create_model, list_models
    from keras_vit.training.trainer import load_trained_model

    if os.path.exists(spec):
        if model_args:
            fail(f"--model_args change a registered architecture; {flag} {spec!r} is a file")
        try:
            model = load_trained_model(spec)
        except ValueError as e:
            fail(f"{flag}: {e}")
        if img_size and model.input_shape[1] != img_size:
            fail(f"--img_size={img_size}, but {spec!r} takes {model.input_shape[1]} px images")
        return model
    if spec not in list_models() and (os.sep in spec or spec.endswith(".keras")):
        fail(f"{flag} {spec!r} does not exist")
    if spec.split(".", 1)[0] not in list_models():
        fail(unknown_model_message(spec, flag))
    try:
        return create_model(spec, **dict(model_args or {}, **({"img_size": img_size}
                                                              if img_size else {})))
    except ValueError as e:  # an invalid size or tag
        fail(f"{flag}: {e}")


def unknown_model_message(name, flag="--model"):
    """The error for a name that is not registered, with the five closest registered names
    (always some, however far: a typo'd family still points somewhere useful)."""
    import difflib

    from keras_vit.registry import list_models

    names = list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.0)
    return (f"{flag} {name!r} is neither an existing file nor a registered model; closest: "
            f"{', '.join(close)} (keras_vit.list_models() lists all {len(names)})")
