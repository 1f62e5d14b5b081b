"""Token mixers against sequence length: one attention layer and a 12-block encoder of it.

The functions behind ``apps/benchmark.py --attention_sweep``:

- ``measure_one`` builds one attention layer (``attention_mixer(kind, dim, heads)``) or an
  encoder of ``depth`` ``TransformerBlock``s of that kind (a functional model on
  (1, N, dim) inputs) and times its batch-1 forward in a tf.function (XLA off): median
  over ``iters`` calls after ``warmup`` (fewer calls once they pass ``time_cap`` seconds);
  peak memory = the process's peak RSS (VmHWM, else ru_maxrss) minus its RSS after the
  imports;
- ``measure_isolated`` runs ``measure_one`` in a fresh interpreter (``python -m
  keras_vit.benchmark_attention JSON``), so that no measurement inherits another's heap;
- ``sweep`` walks kinds x lengths, skipping a measurement whose dense attention matrix
  (N^2 x heads x 4 bytes, for the kinds that build one: dense, topk) exceeds the memory
  budget or whose single call, extrapolated from the previous length (x (N/N')^2 for
  dense/topk, ^1 for linear/bigbird), would exceed ``max_seconds``;
- ``crossover``, ``markdown_table``, ``summary_lines`` and ``plot`` report it.
"""

import json
import math
import os
import subprocess
import sys
import time

from keras_vit.measure import median, peak_rss_mib, reset_peak_rss

KINDS = ("dense", "linear", "bigbird", "topk")
LENGTHS = (196, 784, 3136, 12544, 16384)
MAX_LENGTH = 16384
QUADRATIC = {"dense": 2, "topk": 2, "linear": 1, "bigbird": 1}  # time exponent in N
FULL_MATRIX = ("dense", "topk")  # kinds that build the N x N logits
PARTS = ("layer", "encoder")


def default_args(topk_k=64, block_size=64, num_random=2, window=3, num_global=1, seed=0):
    """{kind: attention_args} of the sweep."""
    return {"dense": {}, "linear": {}, "topk": {"k": topk_k},
            "bigbird": {"block_size": block_size, "window": window, "num_global": num_global,
                        "num_random": num_random, "seed": seed}}


def dense_matrix_bytes(length, heads):
    return length * length * heads * 4


def _current_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mib()[0]


def measure_one(kind, length, part, *, dim=384, num_heads=6, depth=12, attention_args=None,
                warmup=1, iters=5, time_cap=20.0, threads=None, seed=0):
    """{"ms": median call ms, "calls": timed calls, "peak_mib": peak RSS over the RSS
    before the build, "memory_source"} of one layer or encoder forward at batch 1."""
    import tensorflow as tf

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:  # already initialised (in-process sweeps)
            pass
    import keras

    from keras_vit.layers import TransformerBlock
    from keras_vit.layers.efficient_attention import attention_mixer

    reset_peak_rss()
    baseline = _current_rss_mib()
    args = dict(attention_args or {})
    keras.utils.set_random_seed(seed)
    if part == "layer":
        net = attention_mixer(kind, dim, num_heads, **args)
    elif part == "encoder":
        inputs = keras.Input((length, dim), batch_size=1)
        x = inputs
        for i in range(depth):
            x = TransformerBlock(dim, num_heads, attention=kind, attention_args=args,
                                 name=f"block{i}")(x)
        net = keras.Model(inputs, x, name=f"{kind}_encoder")
    else:
        raise ValueError(f"part must be layer or encoder, got {part!r}")
    x = tf.random.stateless_normal((1, length, dim), seed=(seed, 0))
    fn = tf.function(lambda t: net(t, training=False), jit_compile=False)
    for _ in range(warmup):
        fn(x).numpy()
    times, start = [], time.perf_counter()
    while len(times) < max(iters, 1):
        t = time.perf_counter()
        fn(x).numpy()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > time_cap:
            break
    peak, source = peak_rss_mib()
    if source != "VmHWM":  # ru_maxrss is never reset: the baseline is the best estimate
        baseline = min(baseline, peak)
    return {"ms": 1000.0 * median(times), "calls": len(times),
            "peak_mib": max(peak - baseline, 0.0), "memory_source": source}


def measure_isolated(spec, timeout=None):
    """``measure_one(**spec)`` in a fresh interpreter; its result, or {"error": text}."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "keras_vit.benchmark_attention",
                               json.dumps(spec)], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else tail
        return {"error": f"failed (exit {proc.returncode}): {reason}"[:200]}
    return json.loads(lines[-1])


def sweep(kinds=KINDS, lengths=LENGTHS, *, attention_args=None, dim=384, num_heads=6,
          depth=12, warmup=1, iters=5, time_cap=20.0, memory_budget_gb=20.0, max_seconds=60.0,
          isolate=True, threads=None, log=print):
    """Rows {kind, length, part, ms, peak_mib, calls, skipped} for every kind x length x part
    (``skipped``: None, or why the row was not measured)."""
    attention_args = attention_args or default_args()
    rows = []
    for kind in kinds:
        for part in PARTS:
            last = None  # (length, seconds per call), measured or estimated
            for length in sorted(lengths):
                row = dict(kind=kind, length=length, part=part, ms=None, peak_mib=None,
                           calls=0, skipped=None, memory_source=None)
                rows.append(row)
                matrix = dense_matrix_bytes(length, num_heads)
                estimate = None
                if last is not None:
                    estimate = last[1] * (length / last[0]) ** QUADRATIC[kind]
                if kind in FULL_MATRIX and matrix > memory_budget_gb * 1024 ** 3:
                    row["skipped"] = (f"skipped: > budget (attention matrix "
                                      f"{matrix / 1024 ** 3:.1f} GiB > {memory_budget_gb:g})")
                elif estimate is not None and estimate > max_seconds:
                    row["skipped"] = (f"skipped: > budget (estimated {estimate:.0f} s a call "
                                      f"> {max_seconds:g})")
                if row["skipped"]:
                    log(f"  {kind} N={length} {part}: {row['skipped']}")
                    if estimate is not None:
                        last = (length, estimate)
                    continue
                spec = dict(kind=kind, length=length, part=part, dim=dim, num_heads=num_heads,
                            depth=depth, attention_args=attention_args.get(kind, {}),
                            warmup=warmup, iters=iters, time_cap=time_cap, threads=threads)
                t = time.perf_counter()
                if isolate:
                    # warm-up plus timed calls plus the start, with room to spare
                    limit = 120 + (warmup + 2) * max_seconds + 2 * time_cap
                    result = measure_isolated(spec, timeout=limit)
                else:
                    try:
                        result = measure_one(**spec)
                    except Exception as e:  # noqa: BLE001 - reported in the table
                        result = {"error": f"failed: {type(e).__name__}: {e}"[:200]}
                if "error" in result:
                    row["skipped"] = result["error"]
                    log(f"  {kind} N={length} {part}: {row['skipped']}")
                    last = None if estimate is None else (length, max(estimate, max_seconds))
                    continue
                row.update(ms=result["ms"], peak_mib=result["peak_mib"],
                           calls=result["calls"], memory_source=result["memory_source"])
                last = (length, result["ms"] / 1000.0)
                log(f"  {kind} N={length} {part}: {row['ms']:.2f} ms, peak "
                    f"{row['peak_mib']:.0f} MiB ({row['calls']} calls, "
                    f"{time.perf_counter() - t:.0f} s)", flush=True)
    return rows


# --- the report ------------------------------------------------------------------------

def _series(rows, kind, part):
    return sorted((r["length"], r["ms"]) for r in rows
                  if r["kind"] == kind and r["part"] == part and r["ms"])


def crossover(rows, kind, part, reference="dense"):
    """The length from which ``kind`` stays faster than ``reference`` (log-log interpolation
    of the time ratio between the last measured length where it is not faster and the next
    one), as a sentence."""
    a, b = dict(_series(rows, kind, part)), dict(_series(rows, reference, part))
    common = sorted(set(a) & set(b))
    if not common:
        return "not within the measured lengths (no common measured length)"
    ratios = [(n, math.log(a[n] / b[n])) for n in common]  # < 0: kind faster
    last = common[-1]
    if ratios[-1][1] >= 0:
        return (f"not within the measured lengths (up to N = {last:,}: "
                f"{a[last] / b[last]:.2f}x {reference}'s time)")
    slower = [i for i, (_, r) in enumerate(ratios) if r >= 0]
    if not slower:
        return (f"faster at every measured length (from N = {common[0]:,}; "
                f"{a[last] / b[last]:.2f}x {reference}'s time at {last:,})")
    i = slower[-1]
    (n0, r0), (n1, r1) = ratios[i], ratios[i + 1]
    x = math.log(n0) + (math.log(n1) - math.log(n0)) * r0 / (r0 - r1)
    text = (f"N ~ {math.exp(x):,.0f} (between measured {n0:,} and {n1:,}; "
            f"{a[last] / b[last]:.2f}x {reference}'s time at {last:,})")
    earlier = [f"{n:,}" for n, r in ratios[:i] if r < 0]
    if earlier:
        text += f"; also faster at {', '.join(earlier)} before it was not"
    return text


def largest_measured(rows, kind, part):
    series = _series(rows, kind, part)
    return series[-1][0] if series else None


def fits_in(rows, kind, part, gib=24.0):
    """The largest N whose peak memory stays within ``gib`` GiB, extrapolated on a log-log
    line through the two longest measured lengths (None with fewer than two, or memory not
    growing)."""
    series = sorted((r["length"], r["peak_mib"]) for r in rows
                    if r["kind"] == kind and r["part"] == part and r["ms"] and r["peak_mib"])
    if len(series) < 2:
        return None
    (n0, m0), (n1, m1) = series[-2:]
    if m1 <= m0:
        return None
    slope = math.log(m1 / m0) / math.log(n1 / n0)
    return int(n1 * (gib * 1024 / m1) ** (1 / slope))


def _fmt(value, digits=1):
    if value is None:
        return ""
    return f"{value:,.{digits}f}" if value >= 10 else f"{value:.{max(digits, 2)}f}"


def markdown_table(rows):
    """kind | N | layer ms | layer peak MiB | encoder ms | encoder peak MiB."""
    lines = ["| kind | N | layer ms | layer peak MiB | encoder ms | encoder peak MiB |",
             "|---|---|---|---|---|---|"]
    seen = []
    for r in rows:
        if (r["kind"], r["length"]) not in seen:
            seen.append((r["kind"], r["length"]))
    for kind, length in seen:
        cells = []
        for part in PARTS:
            r = next((x for x in rows if (x["kind"], x["length"], x["part"]) == (kind, length,
                                                                                  part)), None)
            if r is None:
                cells += ["", ""]
            elif r["ms"] is None:
                cells += [r["skipped"] or "", ""]
            else:
                cells += [_fmt(r["ms"]), _fmt(r["peak_mib"], 0)]
        lines.append(f"| {kind} | {length:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(rows, kinds):
    out = []
    for kind in kinds:
        if kind == "dense" or "dense" not in kinds:
            continue
        for part in PARTS:
            out.append(f"{kind} faster than dense ({part}): {crossover(rows, kind, part)}")
    for kind in kinds:
        largest = {part: largest_measured(rows, kind, part) for part in PARTS}
        out.append(f"{kind}: largest length measured within the budget: layer "
                   + (f"{largest['layer']:,}" if largest["layer"] else "none") + ", encoder "
                   + (f"{largest['encoder']:,}" if largest["encoder"] else "none"))
    for kind in kinds:
        fits = {part: fits_in(rows, kind, part) for part in PARTS}
        if any(fits.values()):
            out.append(f"{kind}: largest length in 24 GiB (peak memory extrapolated on the "
                       "log-log line of the two longest lengths): "
                       + ", ".join(f"{part} ~{fits[part]:,}" for part in PARTS if fits[part]))
    return out


def plot(rows, kinds, path, title=""):
    """Log-log time vs N per kind, layer and encoder side by side, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=80)
    for ax, part in zip(axes, PARTS):
        for kind in kinds:
            series = _series(rows, kind, part)
            if series:
                ax.plot([n for n, _ in series], [t for _, t in series], "o-", label=kind)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("forward ms (batch 1)")
        ax.set_title("one attention layer" if part == "layer" else "encoder")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":  # the isolated worker: one measurement, a JSON line out
    spec = json.loads(sys.argv[1])
    import tensorflow  # noqa: F401 - the imports belong to the baseline, not the measurement

    import keras_vit  # noqa: F401

    print(json.dumps(measure_one(**spec)), flush=True)
