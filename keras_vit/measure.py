"""Timing and peak-memory primitives of the benchmarks, shared by the Keras side
(keras_vit/benchmark.py) and the timm side (keras_vit/benchmark_timm.py).

Standard library only: benchmark_timm.py runs under an interpreter with torch and timm,
never TensorFlow, and loads this file by its path rather than through the keras_vit package.
"""

import re
import subprocess
import sys
import time

CPU_FLAGS = re.compile(r"^(avx2|avx512\w*|amx\w*|fma)$")


def reset_peak_rss():
    """Resets this process's RSS high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib():
    """(peak RSS in MiB, its source: "VmHWM" or "ru_maxrss")."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0, "VmHWM"
    except OSError:
        pass
    import resource

    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1.0 / 1024.0 if sys.platform != "darwin" else 1.0 / 1024.0 ** 2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"


def median(values):
    values = sorted(float(v) for v in values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def timed(fn, warmup=2, iters=10, seconds=None):
    """Per-call wall times (s) after ``warmup`` calls: ``iters`` calls, or as many as fit in
    ``seconds`` (at least two) when ``seconds`` is set."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while True:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if seconds:
            if time.perf_counter() - start >= seconds and len(times) >= 2:
                return times
        elif len(times) >= iters:
            return times


def cpu_flags():
    """The vector-unit flags of this CPU (lscpu's Flags, else /proc/cpuinfo): avx2,
    avx512*, amx*, fma; None when neither is readable."""
    text = ""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        line = next((ln for ln in text.splitlines() if ln.startswith("Flags:")), "")
        text = line.partition(":")[2]
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    if not text:
        try:
            with open("/proc/cpuinfo") as f:
                line = next((ln for ln in f if ln.startswith("flags")), "")
            text = line.partition(":")[2]
        except OSError:
            return None
    return sorted({flag for flag in text.split() if CPU_FLAGS.match(flag)})
