"""The training input pipeline alone, next to the model's train step: which one bounds a run.

The functions behind ``apps/benchmark.py --input_pipeline``:

- ``synthetic_folder`` writes ImageNet-like JPEGs (random sizes around 500x375, quality
  90, 8 class folders: the shapes generator's images resized with PIL plus grain noise,
  so that they do not compress trivially) and ``prepare_sources`` adds TFRecord shards of
  the same folder (``write_tfrecord``);
- ``InputBench.rate`` times ``make_pipeline(load_examples(...), training=True, ...)``:
  images/s over a fixed number of batches after warm-up batches, a fresh iterator per
  measurement (none left reading ahead while something else is timed);
- ``InputBench.first_batch`` times building a training pipeline at step s and reading its
  first batch: the addressed stream (``make_pipeline(..., start=s * batch)``, constant
  time) or the old replay (the split as a plain tf.data.Dataset through ``seeded_shuffle``,
  then ``.skip(s)`` batches, as the trainer resumed before the stream: every batch before
  s is read, decoded and augmented again);
- ``benchmark_input`` runs the rounds (every input mode, then the model's train step, per
  round; medians over rounds) and returns the rows that ``markdown_tables`` prints.
"""

import os
import time

import numpy as np

from keras_vit.measure import median

SOURCES = ("folder", "tfrecord")
AUGMENTATIONS = {"plain": {}, "randaugment": {"randaugment": True},
                 "mixup": {"mixup": 0.8, "cutmix": 1.0}}
# source, augmentation, cached
INPUT_MODES = tuple(f"{source}_{aug}" for source in SOURCES for aug in AUGMENTATIONS) + tuple(
    f"{source}_plain_cached" for source in SOURCES)
RESUME_STEPS = (0, 10_000, 100_000)
REPLAY_STEPS = (0, 20, 200)


def parse_mode(mode):
    """"folder_randaugment" -> ("folder", "randaugment", False); "tfrecord_plain_cached" ->
    ("tfrecord", "plain", True)."""
    parts = mode.split("_")
    cached = parts[-1] == "cached"
    if cached:
        parts = parts[:-1]
    if len(parts) != 2 or parts[0] not in SOURCES or parts[1] not in AUGMENTATIONS:
        raise ValueError(f"unknown input mode {mode!r}; valid: {', '.join(INPUT_MODES)}")
    return parts[0], parts[1], cached


def mode_label(mode):
    source, aug, cached = parse_mode(mode)
    aug = "mixup 0.8 + cutmix 1.0" if aug == "mixup" else aug
    return f"{source} {aug}" + (" cached" if cached else "")


# --- data -------------------------------------------------------------------------------

def synthetic_folder(root, num_images, *, seed=0, num_classes=8, quality=90, noise=12.0):
    """Writes ``num_images`` JPEGs to root/<class>/<i>.jpg (the shapes generator's 96 px
    images, class = its shape, resized with PIL bicubic to a random size around 500x375,
    three in four landscape, plus Gaussian grain of std ``noise``); returns the mean file
    size in bytes."""
    from PIL import Image

    from keras_vit.data import shapes

    data = shapes.generate(num_images, 96, seed=seed)
    names = shapes.CLASS_NAMES[:num_classes]
    for name in names:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    rng = np.random.default_rng(seed)
    total = 0
    for i, (image, label) in enumerate(zip(data["images"], data["labels"])):
        long = int(rng.integers(400, 601))
        short = int(round(long * rng.uniform(0.66, 0.8)))
        w, h = (long, short) if rng.random() < 0.75 else (short, long)
        pixels = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC), np.float32)
        pixels += rng.normal(0.0, noise, pixels.shape).astype(np.float32)
        path = os.path.join(root, names[int(label) % num_classes], f"{i:06d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG",
                                                                       quality=quality)
        total += os.path.getsize(path)
    return total / max(num_images, 1)


def prepare_sources(data, tmp_dir, num_images, *, seed=0, shards=8, log=print):
    """{source: data spec} and a note on the data. ``data`` ("folder:PATH" or
    "tfrecord:GLOB") is measured as it is (that source only); None generates ``num_images``
    JPEGs in ``tmp_dir`` and TFRecord shards of the same folder."""
    from keras_vit.data import write_tfrecord

    if data:
        kind = data.partition(":")[0]
        if kind not in SOURCES:
            raise ValueError(f"--data must be folder:PATH or tfrecord:GLOB, got {data!r}")
        return {kind: data}, f"data: {data}"
    folder = os.path.join(tmp_dir, "images")
    t = time.perf_counter()
    mean_bytes = synthetic_folder(folder, num_images, seed=seed)
    log(f"  wrote {num_images} JPEGs (mean {mean_bytes / 1024:.0f} KiB) in "
        f"{time.perf_counter() - t:.1f} s")
    prefix = os.path.join(tmp_dir, "tfrecord", "train")
    t = time.perf_counter()
    write_tfrecord(folder, prefix, shards=shards)
    log(f"  wrote {shards} TFRecord shards in {time.perf_counter() - t:.1f} s")
    note = (f"data: {num_images} generated JPEGs (random sizes 400-600 x 264-480 px, mean "
            f"{mean_bytes / 1024:.0f} KiB, quality 90, 8 classes) in a temporary folder, and "
            f"the same images in {shards} TFRecord shards; files in the page cache")
    return {"folder": f"folder:{folder}",
            "tfrecord": f"tfrecord:{prefix}-*-of-{shards:05d}"}, note


# --- measurements -----------------------------------------------------------------------

class InputBench:
    """The sources' Examples, loaded once (their cached copies on first use); each call
    builds a fresh training pipeline and times it."""

    def __init__(self, sources, *, img_size, batch_size, seed=0, log=print):
        from keras_vit.data import load_examples

        self.img_size, self.batch_size, self.seed, self.log = img_size, batch_size, seed, log
        self.examples, self.info, self._cached, self.notes = {}, {}, {}, {}
        for source, spec in sources.items():
            self.examples[source], self.info[source] = load_examples(
                spec, "train", img_size=img_size, seed=seed)

    def examples_of(self, source, cached):
        if not cached:
            return self.examples[source]
        if source not in self._cached:
            t = time.perf_counter()
            self._cached[source] = self.examples[source].cached()
            self.notes[f"{source}_cache"] = time.perf_counter() - t
            self.log(f"  {source}: stored bytes read into memory in "
                     f"{self.notes[f'{source}_cache']:.1f} s")
        return self._cached[source]

    def pipeline(self, data, source, augmentation="plain", start=0):
        from keras_vit.data import make_pipeline

        return make_pipeline(data, training=True, img_size=self.img_size,
                             batch_size=self.batch_size,
                             num_classes=self.info[source].num_classes, seed=self.seed,
                             repeat=True, start=start, **AUGMENTATIONS[augmentation])

    def rate(self, mode, warmup=2, batches=10):
        """Images/s of one input mode: ``batches`` batches timed after ``warmup``."""
        source, aug, cached = parse_mode(mode)
        ds = self.pipeline(self.examples_of(source, cached), source, aug)
        it = iter(ds)
        for _ in range(warmup):
            next(it)
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        elapsed = time.perf_counter() - t
        del it  # stops its read-ahead before anything else is timed
        return batches * self.batch_size / elapsed

    def first_batch(self, source, step, replay=False):
        """Seconds to build the training pipeline at ``step`` and read its first batch."""
        t = time.perf_counter()
        if replay:  # the pre-stream order and resume: seeded_shuffle, skip(step) batches
            ds = self.pipeline(self.examples[source].as_dataset(), source).skip(step)
        else:
            ds = self.pipeline(self.examples[source], source, start=step * self.batch_size)
        it = iter(ds)
        next(it)
        elapsed = time.perf_counter() - t
        del it
        return elapsed


def linear_fit(steps, seconds):
    """(intercept, slope per step) of the least-squares line through the points."""
    steps, seconds = np.asarray(steps, float), np.asarray(seconds, float)
    if len(set(steps)) < 2:
        return float(seconds.mean()), 0.0
    slope, intercept = np.polyfit(steps, seconds, 1)
    return float(intercept), float(slope)


def benchmark_input(sources, *, img_size, batch_size, modes=INPUT_MODES, warmup=2, batches=10,
                    rounds=3, resume_steps=RESUME_STEPS, replay_steps=REPLAY_STEPS,
                    train=None, seed=0, log=print):
    """Rows (dicts) of the input modes measured in ``sources`` ({source: spec}), the model's
    train step (``train``: a callable returning one round's train images/s, or None) and the
    resume costs. Each round measures every input mode, then the train step, then the
    resume points; each figure is the median over rounds."""
    bench = InputBench(sources, img_size=img_size, batch_size=batch_size, seed=seed, log=log)
    modes = [m for m in modes if parse_mode(m)[0] in sources]
    for mode in modes:  # the caches are filled outside the timed rounds
        bench.examples_of(parse_mode(mode)[0], parse_mode(mode)[2])
    per_round = {m: [] for m in modes}
    train_rates, loads = [], []
    resume = {(source, kind, step): [] for source in sources
              for kind, steps in (("addressed", resume_steps), ("replay", replay_steps))
              for step in steps}
    for r in range(rounds):
        loads.append(os.getloadavg()[0])
        for mode in modes:
            per_round[mode].append(bench.rate(mode, warmup, batches))
            log(f"  round {r + 1}/{rounds} {mode_label(mode)}: {per_round[mode][-1]:.1f} img/s")
        if train is not None:
            train_rates.append(train())
            log(f"  round {r + 1}/{rounds} model train step: {train_rates[-1]:.2f} img/s")
        for (source, kind, step), times in resume.items():
            times.append(bench.first_batch(source, step, replay=kind == "replay"))
            log(f"  round {r + 1}/{rounds} {source} {kind} step {step}: first batch in "
                f"{times[-1]:.2f} s")
    loads.append(os.getloadavg()[0])

    train_rate = median(train_rates) if train_rates else None
    rows = []
    for mode in modes:
        rate = median(per_round[mode])
        source, _, cached = parse_mode(mode)
        note = ""
        if cached:
            note = f"bytes read into memory once ({bench.notes[f'{source}_cache']:.1f} s)"
        rows.append(dict(kind="input", mode=mode, label=mode_label(mode), images_per_s=rate,
                         per_round=per_round[mode],
                         vs_train=rate / train_rate if train_rate else None, notes=note))
    if train is not None:
        rows.append(dict(kind="train", mode="train", label="model train step (AdamW)",
                         images_per_s=train_rate, per_round=train_rates, vs_train=1.0,
                         notes="train_on_batch on fixed random inputs, no input pipeline"))
    for source in sources:
        measured = {step: median(resume[(source, "replay", step)]) for step in replay_steps}
        intercept, slope = linear_fit(list(measured), list(measured.values()))
        for step in sorted(set(resume_steps) | set(replay_steps)):
            row = dict(kind="resume", source=source, step=step, replay_slope=slope,
                       addressed=None, replay=None, replay_extrapolated=False,
                       addressed_per_round=resume.get((source, "addressed", step)),
                       replay_per_round=resume.get((source, "replay", step)))
            if step in resume_steps:
                row["addressed"] = median(resume[(source, "addressed", step)])
            if step in measured:
                row["replay"] = measured[step]
            elif len(measured) >= 2 and slope > 0:
                row["replay"], row["replay_extrapolated"] = intercept + slope * step, True
            elif len(measured) >= 2:  # noise swamped the per-step cost: nothing to scale
                row["replay_unmeasurable"] = True
            rows.append(row)
    for row in rows:
        row["load_avg_1m"] = loads
    return rows


# --- the report ------------------------------------------------------------------------

def _seconds(value):
    if value is None:
        return ""
    if value >= 3600:
        return f"{value:,.0f} ({value / 3600:.1f} h)"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def markdown_tables(rows, batch_size):
    """(throughput table, resume table) in markdown."""
    lines = ["| mode | images/s | vs model train | rounds (img/s) | notes |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] in ("input", "train"):
            ratio = "" if r["vs_train"] is None else f"{r['vs_train']:.1f}x"
            rounds = ", ".join(f"{x:.1f}" if x >= 10 else f"{x:.2f}" for x in r["per_round"])
            lines.append(f"| {r['label']} | {r['images_per_s']:.1f} | {ratio} | {rounds} | "
                         f"{r['notes']} |")
    resume = ["| source | resume at step | addressed stream: first batch (s) | old replay "
              "(seeded_shuffle + skip): first batch (s) |", "|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "resume":
            replay = _seconds(r["replay"])
            if r.get("replay_unmeasurable"):
                replay = "not extrapolated: no positive per-step slope (widen --replay_steps)"
            if r["replay_extrapolated"]:
                replay += f", extrapolated ({r['replay_slope']:.3f} s/step)"
            resume.append(f"| {r['source']} | {r['step']:,} (position "
                          f"{r['step'] * batch_size:,}) | {_seconds(r['addressed'])} | "
                          f"{replay} |")
    return "\n".join(lines), "\n".join(resume)


def csv_rows(rows, common):
    """The rows in keras_vit.benchmark's CSV_FIELDS: framework "input" (images/s) or
    "resume" (latency_ms = time to the first batch; notes say which pipeline and whether
    extrapolated)."""
    out = []
    for r in rows:
        if r["kind"] in ("input", "train"):
            out.append(dict(common, framework="input" if r["kind"] == "input" else "keras",
                            mode=r["mode"], images_per_s=r["images_per_s"],
                            images_per_s_per_round=";".join(f"{x:.3f}" for x in r["per_round"]),
                            notes=(f"{r['notes']}; " if r["notes"] else "") + (
                                f"{r['vs_train']:.2f}x model train" if r["vs_train"] else "")))
            continue
        for kind in ("addressed", "replay"):
            if r[kind] is None:
                continue
            per = r[f"{kind}_per_round"]
            extra = (f"extrapolated ({r['replay_slope']:.4f} s/step)" if kind == "replay" and
                     r["replay_extrapolated"] else "measured")
            rounds = ";".join(f"{x:.3f}" for x in per) if per else "none"
            out.append(dict(common, framework="resume", mode=f"{r['source']}_{kind}_step_"
                            f"{r['step']}", latency_ms=1000.0 * r[kind],
                            notes=f"latency_ms: time to the first batch at step {r['step']}; "
                                  f"{extra}; rounds (s): {rounds}"))
    return out
