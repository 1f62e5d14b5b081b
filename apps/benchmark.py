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

--attention_sweep times the token mixers against sequence length
(keras_vit/benchmark_attention.py): for each --attention_kinds and --sequence_lengths, one
attention layer (--attention_dim 384, --attention_heads 6: DeiT-S's) and an encoder of
--attention_depth TransformerBlocks of it, batch-1 forward in a tf.function (XLA off), each
in a fresh process (--isolate) so that its peak RSS over the RSS after the imports is its
own; measurements over --memory_budget_gb (dense attention matrix) or --max_seconds
(extrapolated call) are skipped. Prints the table, the lengths from which linear and
BigBird beat dense, CPU flags and load; --markdown appends, --plot=PATH writes a PNG:

    python apps/benchmark.py --attention_sweep --plot=benchmarks/attention_sweep.png
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_USER_ONEDNN = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
from common import fail, load_model, parse_model_args, prepare_environment  # noqa: E402

prepare_environment()

from absl import app, flags, logging  # noqa: E402

# keras_vit.benchmark's (importing it would load TensorFlow before the flags are checked)
DEFAULT_MODES = ("tf_function", "xla", "tflite_fp32", "tflite_int8", "train")
MODES = DEFAULT_MODES + ("tf_function_bf16", "xla_bf16", "tflite_dynamic", "tflite_int8_mixed",
                         "train_bf16")

F = flags.FLAGS
flags.DEFINE_string("model", "vit_small_patch16_224", "Registered model name "
                    "(keras_vit.list_models()), or a .keras file or training model_dir (timm "
                    "is then not measured).")
flags.DEFINE_string("model_args", "{}", "JSON dict of builder overrides (e.g. '{\"depth\": 2}'); the timm model gets none, so use with --timm=off.")
flags.DEFINE_integer("img_size", None, "Input size (default: the model's).")
flags.DEFINE_integer("batch_size", 8, "Batch size of the throughput (images/s) measurements.")
flags.DEFINE_integer("threads", None, "Threads for TFLite, TensorFlow intra-op and torch (default: the CPU count).")
flags.DEFINE_string("modes", ",".join(DEFAULT_MODES), f"Comma list of: {', '.join(MODES)} "
                    "(*_bf16: the model under Keras' mixed_bfloat16 policy; tflite_dynamic: "
                    "int8 weights, float activations).")
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

flags.DEFINE_bool("attention_sweep", False, "Time the token mixers (layer and encoder) "
                  "against sequence length instead of a model; see the module doc.")
flags.DEFINE_string("attention_kinds", "dense,linear,bigbird,topk", "--attention_sweep: comma "
                    "list of dense, linear, bigbird, topk.")
flags.DEFINE_string("sequence_lengths", "196,784,3136,12544,16384", "--attention_sweep: comma list "
                    "of sequence lengths (up to 16384).")
flags.DEFINE_integer("attention_dim", 384, "--attention_sweep: embedding width.")
flags.DEFINE_integer("attention_heads", 6, "--attention_sweep: heads.")
flags.DEFINE_integer("attention_depth", 12, "--attention_sweep: blocks of the encoder.")
flags.DEFINE_integer("topk_k", 64, "--attention_sweep: k of top-k attention.")
flags.DEFINE_integer("bigbird_block_size", 64, "--attention_sweep: BigBird block size.")
flags.DEFINE_integer("bigbird_window", 3, "--attention_sweep: BigBird window (blocks).")
flags.DEFINE_integer("bigbird_global", 1, "--attention_sweep: BigBird global blocks.")
flags.DEFINE_integer("bigbird_random", 2, "--attention_sweep: BigBird random blocks.")
flags.DEFINE_float("memory_budget_gb", 20.0, "--attention_sweep: skip a measurement whose "
                   "dense attention matrix (N^2 x heads x 4 bytes) exceeds this (dense, topk).")
flags.DEFINE_float("max_seconds", 60.0, "--attention_sweep: skip a measurement whose call, "
                   "extrapolated from the previous length, would take longer than this.")
flags.DEFINE_bool("isolate", True, "--attention_sweep: each measurement in a fresh process "
                  "(false: in this one, for tiny settings; peak memory then less exact).")
flags.DEFINE_string("plot", None, "--attention_sweep: write a log-log PNG to this path.")


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
    if F.attention_sweep:
        _check_sweep_flags()
    return list(dict.fromkeys(modes)), model_args


def _check_sweep_flags():
    """The --attention_sweep flags, before TensorFlow is imported: (kinds, lengths)."""
    from keras_vit.benchmark_attention import KINDS, MAX_LENGTH

    if F.input_pipeline:
        fail("--attention_sweep and --input_pipeline are separate modes; pick one")
    if F.timm == "on":
        fail("--attention_sweep does not involve timm; drop --timm=on")
    kinds = [k.strip() for k in F.attention_kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        fail(f"--attention_kinds: unknown {', '.join(bad) or '(empty)'}; valid: "
             f"{', '.join(KINDS)}")
    lengths = _steps("sequence_lengths")
    if min(lengths) < 1 or max(lengths) > MAX_LENGTH:
        fail(f"--sequence_lengths must lie in 1..{MAX_LENGTH}, got {F.sequence_lengths!r}")
    for name in ("attention_dim", "attention_heads", "attention_depth", "topk_k",
                 "bigbird_block_size", "bigbird_window"):
        if getattr(F, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(F, name)}")
    if F.attention_dim % F.attention_heads:
        fail("--attention_dim must be a multiple of --attention_heads")
    if F.bigbird_global < 0 or F.bigbird_random < 0:
        fail("--bigbird_global and --bigbird_random must be >= 0")
    if F.memory_budget_gb <= 0 or F.max_seconds <= 0:
        fail("--memory_budget_gb and --max_seconds must be > 0")
    return list(dict.fromkeys(kinds)), lengths


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

    if F.attention_sweep:
        return _attention_sweep(threads)

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
    from keras_vit.measure import cpu_flags

    # bfloat16 and int8 speed hinge on AVX-512 BF16 / VNNI / AMX: the flags go with the table
    flags_found = cpu_flags()
    summary.append(f"oneDNN: TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}; "
                   f"threads: {threads}; medians over {F.rounds} alternating rounds; "
                   f"1-min load average {rows[0]['load_avg_1m']} on {os.cpu_count()} CPUs; "
                   "CPU flags: " + (" ".join(flags_found) if flags_found is not None
                                    else "unknown"))
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
    from keras_vit.measure import cpu_flags

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
    flags_found = cpu_flags()
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


def _attention_sweep(threads):
    """--attention_sweep: the mixers' layer and encoder times and peaks against length."""
    from keras_vit import benchmark_attention as ba
    from keras_vit.measure import cpu_flags

    kinds, lengths = _check_sweep_flags()
    args = ba.default_args(topk_k=F.topk_k, block_size=F.bigbird_block_size,
                           window=F.bigbird_window, num_global=F.bigbird_global,
                           num_random=F.bigbird_random)
    warmup = F.warmup if F["warmup"].present else 2
    iters = F.iters if F["iters"].present else 5
    loads = [os.getloadavg()[0]]
    start = time.perf_counter()
    rows = ba.sweep(kinds, lengths, attention_args=args, dim=F.attention_dim,
                    num_heads=F.attention_heads, depth=F.attention_depth, warmup=warmup,
                    iters=iters, memory_budget_gb=F.memory_budget_gb,
                    max_seconds=F.max_seconds, isolate=F.isolate, threads=threads)
    loads.append(os.getloadavg()[0])
    table = ba.markdown_table(rows)
    flags_found = cpu_flags()
    sources = {r["memory_source"] for r in rows if r["memory_source"]}
    summary = ba.summary_lines(rows, kinds) + [
        f"layer: attention_mixer(kind, {F.attention_dim}, {F.attention_heads}); encoder: "
        f"{F.attention_depth} TransformerBlock({F.attention_dim}, {F.attention_heads}) of it, "
        "a functional model; batch 1, forward in a tf.function (XLA off), median ms over up "
        f"to {iters} calls after {warmup}; topk k={F.topk_k}; bigbird block_size="
        f"{F.bigbird_block_size}, window={F.bigbird_window}, num_global={F.bigbird_global}, "
        f"num_random={F.bigbird_random}",
        "peak MiB: peak RSS (" + ("/".join(sorted(sources)) or "none") + ") of the measuring "
        "process over its RSS after the imports, "
        + ("each measurement in a fresh process" if F.isolate else
           "all in this process (--noisolate: freed memory of earlier rows is reused, so "
           "the peaks are lower bounds)"),
        f"budget: --memory_budget_gb={F.memory_budget_gb:g} (dense/topk attention matrix "
        f"N^2 x heads x 4 bytes), --max_seconds={F.max_seconds:g} (a call extrapolated from "
        "the previous length: x ratio^2 for dense/topk, ^1 for linear/bigbird)",
        "CPU flags: " + (" ".join(flags_found) if flags_found is not None else "unknown")
        + f"; {os.cpu_count()} CPUs; threads: {threads}; oneDNN: TF_ENABLE_ONEDNN_OPTS="
        f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS')}",
        "1-min load average at the start and the end: "
        + ", ".join(f"{x:.2f}" for x in loads)
        + f"; the sweep took {time.perf_counter() - start:.0f} s",
    ]
    print()
    print(table)
    print()
    print("\n".join(summary))
    if F.plot:
        ba.plot(rows, kinds, F.plot, title=f"dim {F.attention_dim}, {F.attention_heads} "
                f"heads, batch 1, {os.cpu_count()} CPUs")
        print(f"plot written to {F.plot}")
    if F.markdown:
        with open(F.markdown, "a") as f:
            f.write(table + "\n\n" + "\n".join(f"- {s}" for s in summary) + "\n\n")


if __name__ == "__main__":
    app.run(main)
