"""Speed and memory of a keras_vit model on this CPU, next to timm's, in one run.

    python apps/benchmark.py --model=vit_small_patch16_224 --batch_size=8 \
        --timm_python=/path/to/venv-with-torch-and-timm/bin/python --csv=benchmarks/results.csv

Modes (--modes, comma list): tf_function, xla (tf.function with jit_compile), tflite_fp32,
tflite_int8 (builtin-only files from keras_vit.export.export_tflite, run with
ai_edge_litert and --threads threads; int8 calibrated on random images: speed only) and
train (model.train_on_batch with AdamW). Each reports images/s at --batch_size, batch-1
latency (ms) and the peak RSS of the measuring process. With --timm (auto: when the
interpreter has torch and timm) the timm model of the same name is measured in a separate
process, Keras and timm rounds alternating, and each ratio is Keras images/s over timm's.

--onednn=on|off sets TF_ENABLE_ONEDNN_OPTS before TensorFlow is imported (auto: the
user's setting, else on). To compare both, run the tool twice, e.g. with
--onednn=on --csv=X and --onednn=off --csv=X.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_USER_ONEDNN = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
from common import fail, load_model, parse_model_args, prepare_environment  # noqa: E402

prepare_environment()

from absl import app, flags, logging  # noqa: E402

MODES = ("tf_function", "xla", "tflite_fp32", "tflite_int8", "train")

F = flags.FLAGS
flags.DEFINE_string("model", "vit_small_patch16_224", "Registered model name "
                    "(keras_vit.list_models()), or a .keras file or training model_dir (timm "
                    "is then not measured).")
flags.DEFINE_string("model_args", "{}", "JSON dict of builder overrides (e.g. '{\"depth\": 2}'); the timm model gets none, so use with --timm=off.")
flags.DEFINE_integer("img_size", None, "Input size (default: the model's).")
flags.DEFINE_integer("batch_size", 8, "Batch size of the throughput (images/s) measurements.")
flags.DEFINE_integer("threads", None, "Threads for TFLite, TensorFlow intra-op and torch (default: the CPU count).")
flags.DEFINE_string("modes", ",".join(MODES), f"Comma list of: {', '.join(MODES)}.")
flags.DEFINE_integer("warmup", 2, "Untimed calls before each measurement.")
flags.DEFINE_integer("iters", 10, "Timed calls per measurement (the median call is used).")
flags.DEFINE_float("seconds", None, "Time each measurement for this long instead of --iters calls.")
flags.DEFINE_integer("rounds", 3, "Alternating Keras/timm rounds; medians over rounds are reported.")
flags.DEFINE_enum("timm", "auto", ["auto", "on", "off"], "Measure the timm model of the same name in a separate process (auto: when torch and timm import).")
flags.DEFINE_string("timm_python", None, "Interpreter with torch and timm (default: this one).")
flags.DEFINE_enum("onednn", "auto", ["auto", "on", "off"], "TF_ENABLE_ONEDNN_OPTS for this run (auto: the user's setting, else on).")
flags.DEFINE_bool("train_jit_compile", True, "Compile the train step with XLA.")
flags.DEFINE_string("csv", None, "Append one row per measurement to this CSV file.")
flags.DEFINE_string("markdown", None, "Also append the markdown table to this file.")


def _check_flags():
    """Every flag error before TensorFlow is imported or any model is built."""
    modes = [m.strip() for m in F.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        fail(f"--modes: unknown {', '.join(bad) or '(empty)'}; valid: {', '.join(MODES)}")
    for name in ("batch_size", "img_size", "threads", "iters", "rounds"):
        value = getattr(F, name)
        if value is not None and value < 1:
            fail(f"--{name} must be >= 1, got {value}")
    if F.warmup < 0:
        fail(f"--warmup must be >= 0, got {F.warmup}")
    if F.seconds is not None and F.seconds <= 0:
        fail(f"--seconds must be > 0, got {F.seconds}")
    model_args = parse_model_args(F.model_args)
    if model_args and F.timm == "on":
        fail("--model_args changes the architecture, so timm's model would differ; use --timm=off")
    if F.timm_python and not os.path.exists(F.timm_python):
        fail(f"--timm_python: no such file {F.timm_python!r}")
    return list(dict.fromkeys(modes)), model_args


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    modes, model_args = _check_flags()
    logging.set_verbosity(logging.WARNING)  # TF's INFO lines would bury the table
    if F.onednn != "auto":
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if F.onednn == "on" else "0"
    elif _USER_ONEDNN is not None:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = _USER_ONEDNN
    threads = F.threads or os.cpu_count()

    import tensorflow as tf  # TensorFlow loads here, after TF_ENABLE_ONEDNN_OPTS is final

    tf.config.threading.set_intra_op_parallelism_threads(threads)  # before any model exists

    import keras_vit
    from keras_vit import benchmark as bm

    model = load_model(F.model, flag="--model", img_size=F.img_size, model_args=model_args)
    registered = F.model in keras_vit.list_models()
    if F.timm == "on" and not registered:
        fail(f"--timm=on needs a registered --model; {F.model!r} is a file")

    timm_python = None
    if F.timm != "off" and registered and not model_args:
        python = F.timm_python or sys.executable
        if bm.timm_importable(python):
            timm_python = python
        elif F.timm == "on":
            fail(f"--timm=on but {python} cannot import torch and timm; pass --timm_python")
        else:
            print(f"timm not measured: {python} cannot import torch and timm", flush=True)

    try:
        rows = bm.benchmark(model, name=F.model, batch_size=F.batch_size, threads=threads,
                            modes=modes, warmup=F.warmup, iters=F.iters, seconds=F.seconds,
                            rounds=F.rounds, timm_python=timm_python,
                            train_jit_compile=F.train_jit_compile)
    except bm.TimmUnavailable as e:
        fail(f"timm: {e}")

    table = bm.markdown_table(rows)
    lat = {r["mode"]: r["latency_ms"] for r in rows if r["framework"] == "keras"}
    summary = []
    if lat.get("tflite_int8") and lat.get("tflite_fp32"):
        summary.append(f"TFLite int8 / fp32 batch-1 latency: "
                       f"{lat['tflite_int8'] / lat['tflite_fp32']:.2f}")
    mem = rows[0]["memory_source"]
    summary.append("peak RSS: " + ("kernel VmHWM of the measuring process, reset before each "
                                   "measurement" if mem == "VmHWM" else
                                   "ru_maxrss, a running maximum over the whole run"))
    summary.append(f"oneDNN: TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}; "
                   f"threads: {threads}; medians over {F.rounds} alternating rounds; "
                   f"1-min load average {rows[0]['load_avg_1m']} on {os.cpu_count()} CPUs")
    print()
    print(table)
    print()
    print("\n".join(summary))
    if F.csv:
        bm.append_csv(F.csv, rows)
        print(f"appended {len(rows)} rows to {F.csv}")
    if F.markdown:
        with open(F.markdown, "a") as f:
            f.write(table + "\n\n" + "\n".join(f"- {s}" for s in summary) + "\n\n")


if __name__ == "__main__":
    app.run(main)
