"""Speed and memory of keras_vit models on the host CPU, with timm measured alongside.

The functions behind apps/benchmark.py. Modes (each at batch B for images/s and at batch 1
for latency, except ``train``):

- ``tf_function``: ``tf.function(model(x, training=False))``, ``jit_compile=False``;
- ``xla``: the same with ``jit_compile=True``;
- ``tflite_fp32`` / ``tflite_int8``: builtin-only .tflite files written by
  ``keras_vit.export.export_tflite`` to a temporary directory (one file at batch B, one at
  batch 1), run by ai_edge_litert with N threads. int8 is calibrated on random normal
  images, so its agreement with Keras means nothing (and the weights are random anyway);
  it is a speed measurement only;
- ``train``: images/s of ``model.train_on_batch`` with AdamW and sparse cross-entropy
  (XLA-compiled unless ``train_jit_compile=False``), batch B.

The timm reference runs in a separate process (keras_vit/benchmark_timm.py under the
interpreter that has torch and timm; DESIGN.md: Keras under XLA and timm in one process
segfaulted with oneDNN on), kept alive across rounds so that Keras and timm runs alternate
and each side's median over rounds is reported. Peak memory is the RSS high-water mark
(Linux VmHWM, reset before each measurement through /proc/self/clear_refs) of the
measuring process; where that is unavailable, ``ru_maxrss`` (never reset: a running
maximum); the table says which.
"""

import csv
import json
import os
import subprocess
import tempfile
import time

import numpy as np

from keras_vit.measure import median, peak_rss_mib, reset_peak_rss, timed  # noqa: F401

# What a plain run measures; MODES adds the reduced-precision ones (bf16: the model under
# Keras' mixed_bfloat16 policy; dynamic: int8 weights, float activations).
DEFAULT_MODES = ("tf_function", "xla", "tflite_fp32", "tflite_int8", "train")
MODES = DEFAULT_MODES + ("tf_function_bf16", "xla_bf16", "tflite_dynamic", "tflite_int8_mixed",
                         "train_bf16")
TIMM_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_timm.py")
CSV_FIELDS = ("timestamp", "model", "framework", "mode", "img_size", "batch_size", "threads",
              "onednn", "images_per_s", "latency_ms", "peak_rss_mib", "memory_source",
              "images_per_s_vs_timm", "rounds", "images_per_s_per_round", "load_avg_1m",
              "notes")


# --- measurement primitives -------------------------------------------------------------

def onednn_state():
    """TF_ENABLE_ONEDNN_OPTS as TensorFlow saw it at import ("on", "off" or "tf default")."""
    value = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if value is None:
        return "tf default"
    return "on" if value.strip().lower() in ("1", "true") else "off"


# --- the Keras side ---------------------------------------------------------------------

def input_shape(model, img_size):
    """One sample's shape: the model's input shape, its unknown sizes ``img_size``. So a
    model on tokens ((N, C) inputs, e.g. a chain of linear layers saved as .keras) is timed
    on its own shape, and an image model at ``img_size`` px."""
    shape = model.input_shape
    if isinstance(shape, list):
        raise ValueError(f"the benchmark times single-input models; {model.name!r} has "
                         f"{len(shape)} inputs")
    return tuple(img_size if d is None else int(d) for d in shape[1:])


def _inputs(batch, shape, seed):
    return np.random.default_rng(seed).standard_normal((batch,) + tuple(shape)).astype(
        np.float32)


class KerasBench:
    """One model, set up once per mode; ``run(mode)`` returns one round's numbers."""

    def __init__(self, model, img_size, batch_size, threads, warmup=2, iters=10, seconds=None,
                 tmp_dir=None, train_jit_compile=True, log=print):
        self.model, self.img_size, self.batch_size = model, img_size, batch_size
        self.sample_shape = input_shape(model, img_size)
        self.threads, self.warmup, self.iters, self.seconds = threads, warmup, iters, seconds
        self.train_jit_compile = train_jit_compile
        self.tmp_dir = tmp_dir or tempfile.mkdtemp(prefix="keras_vit_bench_")
        self.log = log
        self.x_batch = _inputs(batch_size, self.sample_shape, 0)
        self.x_one = _inputs(1, self.sample_shape, 1)
        self._callables = {}
        self.notes = {}

    def _model(self, mode):
        """The model itself, or for a *_bf16 mode its copy under mixed_bfloat16 (one copy)."""
        if not mode.endswith("_bf16"):
            return self.model
        if "bf16" not in self._callables:
            from keras_vit.precision import reduced_precision_note, with_dtype_policy

            self._callables["bf16"] = with_dtype_policy(self.model, "mixed_bfloat16")
            self.notes["bf16"] = reduced_precision_note("mixed_bfloat16") or ""
        if self.notes["bf16"]:
            self.notes[mode] = self.notes["bf16"]
        return self._callables["bf16"]

    # Each setup returns (batch-B callable, batch-1 callable or None).
    def _setup_tf(self, jit_compile, model):
        import tensorflow as tf

        fn = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile)
        xb, x1 = tf.constant(self.x_batch), tf.constant(self.x_one)
        return (lambda: fn(xb)), (lambda: fn(x1))

    def _setup_tflite(self, quantization):
        from keras_vit.export import export_tflite
        from keras_vit.export.tflite import LiteRTRunner

        runners = []
        for batch in dict.fromkeys((self.batch_size, 1)):  # one file when B is 1
            path = os.path.join(self.tmp_dir, f"{self.model.name}_{quantization}_b{batch}.tflite")
            if quantization in ("int8", "dynamic", "int8_mixed"):
                # Random calibration data: a speed measurement only; export_tflite's top-1
                # agreement check is meaningless for random data and weights, so skipped.
                calib = _inputs(max(2 * batch, 8), self.sample_shape, 2)
                report = export_tflite(self.model, path, quantization, representative_data=calib,
                                       batch_size=batch, verify=False)
            else:
                report = export_tflite(self.model, path, "none", batch_size=batch)
                self.notes["tflite_fp32"] = (f"fp32 file verified against Keras: rel. diff "
                                             f"{report['relative_diff']:.1e}")
            self.notes.setdefault(f"size_{quantization}", report["size_bytes"])
            runners.append(LiteRTRunner(path, num_threads=self.threads))
        rb, r1 = runners[0], runners[-1]
        xb, x1 = self.x_batch, self.x_one
        if quantization.startswith("int8"):
            self.notes[f"tflite_{quantization}"] = (
                f"{quantization} calibrated on random normal images; speed only (agreement "
                "meaningless with random weights; int8_mixed: every matmul and conv int8)")
        elif quantization == "dynamic":
            self.notes["tflite_dynamic"] = "int8 weights; speed only (not verified)"
        return (lambda: rb(xb)), (lambda: r1(x1))

    def _setup_train(self, model):
        import keras

        n_out = len(model.outputs)
        num_classes = int(model.outputs[0].shape[-1])
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        from keras_vit.training.optimizers import AdamW  # the apps' AdamW

        model.compile(optimizer=AdamW(1e-4, weight_decay=0.05),
                      loss=[loss] * n_out if n_out > 1 else loss,
                      jit_compile=self.train_jit_compile)
        labels = np.random.default_rng(3).integers(0, num_classes, self.batch_size)
        y = [labels] * n_out if n_out > 1 else labels
        xb = self.x_batch
        return (lambda: model.train_on_batch(xb, y)), None

    def setup(self, mode):
        if mode not in self._callables:
            t = time.perf_counter()
            if mode in ("tf_function", "xla", "tf_function_bf16", "xla_bf16"):
                self._callables[mode] = self._setup_tf(mode.startswith("xla"), self._model(mode))
            elif mode.startswith("tflite_"):
                self._callables[mode] = self._setup_tflite(
                    mode[len("tflite_"):].replace("fp32", "none"))
            elif mode in ("train", "train_bf16"):
                self._callables[mode] = self._setup_train(self._model(mode))
            else:
                raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
            self.log(f"  set up {mode} in {time.perf_counter() - t:.1f} s")
        return self._callables[mode]

    def run(self, mode):
        batch_fn, one_fn = self.setup(mode)
        reset_peak_rss()
        times = timed(batch_fn, self.warmup, self.iters, self.seconds)
        result = {"images_per_s": self.batch_size / median(times)}
        if one_fn is not None:
            result["latency_ms"] = 1000.0 * median(timed(one_fn, self.warmup, self.iters,
                                                         self.seconds))
        result["peak_rss_mib"], result["memory_source"] = peak_rss_mib()
        return result


# --- the timm side ----------------------------------------------------------------------

class TimmUnavailable(RuntimeError):
    """The reference interpreter lacks torch/timm, or timm lacks the model."""


def timm_importable(python):
    """True when ``python`` can import torch and timm (checked in a subprocess)."""
    try:
        out = subprocess.run([python, "-c", "import torch, timm"], capture_output=True,
                             timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


class TimmProcess:
    """keras_vit/benchmark_timm.py running under ``python``, answering one round per call."""

    def __init__(self, python, model, img_size, batch_size, threads, num_classes=None):
        cmd = [python, TIMM_SCRIPT, f"--model={model}", f"--img_size={img_size}",
               f"--batch_size={batch_size}", f"--threads={threads}"]
        if num_classes is not None:
            cmd.append(f"--num_classes={num_classes}")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.info = self._read()
        if "error" in self.info or not self.info.get("ready"):
            self.close()
            raise TimmUnavailable(self.info.get("error", "the timm process did not start"))

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()[-2000:]
            raise TimmUnavailable(f"the timm process exited ({self.proc.wait()}): {err}")
        return json.loads(line)

    def run(self, mode, warmup=2, iters=10, seconds=None):
        self.proc.stdin.write(json.dumps(dict(mode=mode, warmup=warmup, iters=iters,
                                              seconds=seconds)) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"mode": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


# --- the whole run ----------------------------------------------------------------------

def benchmark(model, name, *, batch_size=8, threads=None, modes=DEFAULT_MODES, warmup=2, iters=10,
              seconds=None, rounds=3, timm_python=None, train_jit_compile=True, log=print):
    """Measures the Keras ``model`` in each mode and, when ``timm_python`` is given, timm's
    model of the registered ``name`` at the same input size, alternating Keras and timm
    rounds. Returns a list of row dicts (medians over rounds) labelled ``name``."""
    threads = threads or os.cpu_count()
    img_size = int(model.input_shape[1])
    shape = input_shape(model, img_size)
    on = f"{img_size} px" if len(shape) == 3 else f"{shape} inputs"
    log(f"{name} on {on} ({model.count_params() / 1e6:.2f} M parameters)")
    tmp = tempfile.TemporaryDirectory(prefix="keras_vit_bench_")  # the .tflite files
    bench = KerasBench(model, img_size, batch_size, threads, warmup, iters, seconds,
                       tmp_dir=tmp.name, train_jit_compile=train_jit_compile, log=log)
    timm_proc = None
    if timm_python:
        num_classes = int(model.outputs[0].shape[-1])
        timm_proc = TimmProcess(timm_python, name, img_size, batch_size, threads,
                                num_classes=num_classes)
        log(f"timm {timm_proc.info['timm']} (torch {timm_proc.info['torch']}, "
            f"{timm_proc.info['threads']} threads), {timm_proc.info['params'] / 1e6:.2f} M "
            "parameters")
    train_modes = {m for m in modes if m.startswith("train")}
    timm_modes = [m for m in ("infer", "train") if timm_proc and (
        m == "train" and train_modes or m == "infer" and set(modes) - train_modes)]
    per_round = {("keras", m): [] for m in modes}
    per_round.update({("timm", m): [] for m in timm_modes})
    loads = []
    try:
        for mode in modes:  # conversions and compilations happen outside the timed rounds
            bench.setup(mode)
        for r in range(rounds):
            loads.append(os.getloadavg()[0])
            for mode in modes:
                res = bench.run(mode)
                per_round[("keras", mode)].append(res)
                log(f"  round {r + 1}/{rounds} keras {mode}: {_fmt_round(res)}")
            for mode in timm_modes:
                res = timm_proc.run(mode, warmup, iters, seconds)
                per_round[("timm", mode)].append(res)
                log(f"  round {r + 1}/{rounds} timm {mode}: {_fmt_round(res)}")
    finally:
        if timm_proc:
            timm_proc.close()
        tmp.cleanup()

    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    common = dict(timestamp=stamp, model=name, img_size=img_size, batch_size=batch_size,
                  threads=threads, onednn=onednn_state(), rounds=rounds,
                  load_avg_1m=round(median(loads), 2))
    rows = []
    for (framework, mode), results in per_round.items():
        row = dict(common, framework=framework, mode=mode)
        row["images_per_s"] = median([x["images_per_s"] for x in results])
        row["images_per_s_per_round"] = ";".join(f"{x['images_per_s']:.3f}" for x in results)
        lat = [x["latency_ms"] for x in results if "latency_ms" in x]
        row["latency_ms"] = median(lat) if lat else None
        row["peak_rss_mib"] = max(x["peak_rss_mib"] for x in results)
        row["memory_source"] = results[0]["memory_source"]
        row["notes"] = bench.notes.get(mode, "") if framework == "keras" else (
            f"timm {timm_proc.info['timm']}, torch {timm_proc.info['torch']}, eval, "
            "inference_mode" if mode == "infer" else "timm AdamW step")
        rows.append(row)
    reference = {r["mode"]: r["images_per_s"] for r in rows if r["framework"] == "timm"}
    for row in rows:
        ref = reference.get("train" if row["mode"].startswith("train") else "infer")
        row["images_per_s_vs_timm"] = (row["images_per_s"] / ref
                                       if ref and row["framework"] == "keras" else None)
    return rows


def _fmt_round(res):
    text = f"{res['images_per_s']:.2f} img/s"
    if "latency_ms" in res:
        text += f", {res['latency_ms']:.1f} ms"
    return text + f", peak {res['peak_rss_mib']:.0f} MiB"


def _num(value, fmt):
    return "" if value is None or value == "" else format(value, fmt)


def markdown_table(rows):
    """The rows as a markdown table (images/s at batch B, batch-1 latency, peak RSS, ratio)."""
    lines = ["| model | framework | mode | img | batch | threads | oneDNN | images/s | "
             "batch-1 latency (ms) | peak RSS (MiB) | images/s vs timm |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = _num(r["peak_rss_mib"], ".0f")
        if r["memory_source"] != "VmHWM":
            mem += f" ({r['memory_source']})"
        lines.append(
            f"| {r['model']} | {r['framework']} | {r['mode']} | {r['img_size']} | "
            f"{r['batch_size']} | {r['threads']} | {r['onednn'] if r['framework'] == 'keras' else '-'} | "
            f"{_num(r['images_per_s'], '.2f')} | {_num(r['latency_ms'], '.1f')} | {mem} | "
            f"{_num(r['images_per_s_vs_timm'], '.2f')} |")
    return "\n".join(lines)


def append_csv(path, rows):
    """Appends the rows to ``path`` (header written when the file is new or empty)."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else (
                round(row[k], 4) if isinstance(row[k], float) else row[k])) for k in CSV_FIELDS})
