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

--input_pipeline measures the training input pipeline alone (keras_vit/benchmark_input.py),
so that a user sees whether input or model bounds training:

    python apps/benchmark.py --input_pipeline --model=deit_small_patch16_224 --batch_size=32

Data: --data=folder:PATH or tfrecord:GLOB (that source only), else --input_images generated
JPEGs (random sizes around 500x375, quality 90, 8 classes) in a temporary folder and 8
TFRecord shards of them. Rows: images/s of make_pipeline(training=True) for each
--input_modes (source folder/tfrecord x augmentation plain/randaugment/mixup (MixUp 0.8 +
CutMix 1.0), plain also with the stored bytes cached in memory), --input_batches batches
after --input_warmup; and ALWAYS one row of the model's train step (train_on_batch with
AdamW at --batch_size, timed over --iters calls after --warmup, in this mode 2 and 1 unless
given), the denominator of the "vs model train" column. Resume rows: seconds to the first
batch of a training pipeline built at each --resume_steps step with the addressed stream
(start=step * batch), against the old replay (seeded_shuffle, then .skip(step) batches)
measured at --replay_steps and extrapolated linearly to the larger steps. Medians over
--rounds rounds; the model's other modes run too only when --modes is given; timm is not
involved.
"""

import os
import sys
import time

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
flags.DEFINE_bool("input_pipeline", False, "Measure the training input pipeline (and the "
                  "model's train step next to it) instead of the model modes; see the module "
                  "doc. With --modes given, those model modes run too (timm never).")
flags.DEFINE_string("data", None, "--input_pipeline data: folder:PATH or tfrecord:GLOB (default: "
                    "generated JPEGs and TFRecord shards of them in a temporary folder).")
flags.DEFINE_integer("input_images", 512, "--input_pipeline: how many JPEGs to generate.")
flags.DEFINE_string("input_modes", None, "--input_pipeline: comma list of SOURCE_AUG[_cached] "
                    "(default: all of them, those of the --data source only).")
flags.DEFINE_integer("input_warmup", 2, "--input_pipeline: untimed batches per measurement.")
flags.DEFINE_integer("input_batches", 5, "--input_pipeline: timed batches per measurement.")
flags.DEFINE_string("resume_steps", "0,10000,100000", "--input_pipeline: steps at which the "
                    "addressed stream's first batch is timed.")
flags.DEFINE_string("replay_steps", "0,10,50", "--input_pipeline: steps at which the old "
                    "replay (seeded_shuffle + skip) is timed (at least two distinct; larger "
                    "--resume_steps are extrapolated from them).")


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
    if F.input_pipeline:
        _check_input_flags()
    return list(dict.fromkeys(modes)), model_args


def _steps(name):
    try:
        steps = [int(x) for x in getattr(F, name).split(",") if x.strip()]
    except ValueError:
        fail(f"--{name} must be a comma list of integers, got {getattr(F, name)!r}")
    if not steps or min(steps) < 0:
        fail(f"--{name} must be a non-empty comma list of steps >= 0, got {getattr(F, name)!r}")
    return sorted(set(steps))


def _check_input_flags():
    """The --input_pipeline flags, before TensorFlow is imported; their parsed values."""
    from keras_vit.benchmark_input import INPUT_MODES, SOURCES

    if F.timm == "on":
        fail("--input_pipeline does not involve timm; drop --timm=on")
    if F.data is not None and F.data.partition(":")[0] not in SOURCES:
        fail(f"--data must be folder:PATH or tfrecord:GLOB, got {F.data!r}")
    if F.data is None and F.input_images < 8:
        fail(f"--input_images must be >= 8 (one per class folder), got {F.input_images}")
    if F.input_warmup < 0 or F.input_batches < 1:
        fail("--input_warmup must be >= 0 and --input_batches >= 1")
    modes = [m.strip() for m in (F.input_modes or ",".join(INPUT_MODES)).split(",")
             if m.strip()]
    bad = [m for m in modes if m not in INPUT_MODES]
    if not modes or bad:
        fail(f"--input_modes: unknown {', '.join(bad) or '(empty)'}; valid: "
             f"{', '.join(INPUT_MODES)}")
    if F.data is not None:
        source = F.data.partition(":")[0]
        if F.input_modes and any(not m.startswith(source + "_") for m in modes):
            fail(f"--input_modes: --data is a {source} source, so only {source}_* modes")
    replay = _steps("replay_steps")
    if len(replay) < 2:
        fail(f"--replay_steps needs two distinct steps for the per-step slope, got "
             f"{F.replay_steps!r}")
    return list(dict.fromkeys(modes)), _steps("resume_steps"), replay


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
    if F.input_pipeline:
        model_rows = None
        if F["modes"].present:  # the model modes asked for too (timm never)
            model_rows = bm.benchmark(model, name=F.model, batch_size=F.batch_size,
                                      threads=threads, modes=modes, warmup=F.warmup,
                                      iters=F.iters, seconds=F.seconds, rounds=F.rounds,
                                      train_jit_compile=F.train_jit_compile)
        return _input_pipeline(model, threads, model_rows)
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



def _input_pipeline(model, threads, model_rows):
    """--input_pipeline: the input modes, the model's train step and the resume costs."""
    import shutil
    import tempfile

    from keras_vit import benchmark as bm
    from keras_vit import benchmark_input as bi

    input_modes, resume_steps, replay_steps = _check_input_flags()
    img_size = int(model.input_shape[1])
    tmp = tempfile.mkdtemp(prefix="keras_vit_input_bench_")
    try:
        sources, data_note = bi.prepare_sources(F.data, tmp, F.input_images)
        bench = bm.KerasBench(model, img_size, F.batch_size, threads,
                              warmup=F.warmup if F["warmup"].present else 1,
                              iters=F.iters if F["iters"].present else 2, seconds=F.seconds,
                              tmp_dir=tmp, train_jit_compile=F.train_jit_compile)
        print(f"{F.model} train step at batch {F.batch_size}, {img_size} px "
              f"({model.count_params() / 1e6:.2f} M parameters)", flush=True)
        rows = bi.benchmark_input(
            sources, img_size=img_size, batch_size=F.batch_size, modes=input_modes,
            warmup=F.input_warmup, batches=F.input_batches, rounds=F.rounds,
            resume_steps=resume_steps, replay_steps=replay_steps,
            train=lambda: bench.run("train")["images_per_s"])
    except ValueError as e:  # a --data that cannot be read
        fail(f"--data: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    throughput, resume = bi.markdown_tables(rows, F.batch_size)
    loads = rows[0]["load_avg_1m"]
    flags_found = bi.cpu_flags()
    summary = [
        f"model: {F.model} train step (train_on_batch, AdamW, XLA "
        f"{'on' if F.train_jit_compile else 'off'}) at batch {F.batch_size}, {img_size} px; "
        f"input: make_pipeline(training=True) at batch {F.batch_size}, {img_size} px, "
        f"{F.input_batches} batches timed after {F.input_warmup}; medians over {F.rounds} "
        "rounds",
        data_note,
        "resume: time to build the pipeline at step s and read its first batch (plain "
        "augmentation); addressed = make_pipeline(Examples, start=s * batch); old replay = "
        "the split as a tf.data.Dataset through seeded_shuffle (min(2048, N) decoded images "
        "fill its buffer first), then .skip(s) batches (each read, decoded and augmented); "
        "steps beyond --replay_steps extrapolated linearly",
        "vs model train: input images/s over the train step's; above 1 the pipeline "
        "outruns the model (model-bound), below 1 training waits for input (measured apart: in "
        "a real run both share the same cores and slow each other)",
        "CPU flags: " + (" ".join(flags_found) if flags_found is not None else "unknown")
        + f"; {os.cpu_count()} CPUs; threads: {threads}; oneDNN: TF_ENABLE_ONEDNN_OPTS="
        f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS')}",
        "1-min load average at the round starts and the end: "
        + ", ".join(f"{x:.2f}" for x in loads),
    ]
    print()
    print(throughput)
    print()
    print(resume)
    print()
    print("\n".join(summary))
    if model_rows:
        print()
        print(bm.markdown_table(model_rows))
    if F.csv:
        common = dict(timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"), model=F.model,
                      img_size=img_size, batch_size=F.batch_size, threads=threads,
                      onednn=bm.onednn_state(), rounds=F.rounds,
                      load_avg_1m=round(bm.median(loads), 2))
        out = bi.csv_rows(rows, common) + list(model_rows or [])
        bm.append_csv(F.csv, out)
        print(f"appended {len(out)} rows to {F.csv}")
    if F.markdown:
        with open(F.markdown, "a") as f:
            f.write(throughput + "\n\n" + resume + "\n\n" + "\n".join(
                f"- {s}" for s in summary) + "\n\n")
            if model_rows:
                f.write(bm.markdown_table(model_rows) + "\n\n")


if __name__ == "__main__":
    app.run(main)
