import os

# Before TensorFlow loads: CPU only, quiet logs, the TF backend.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# oneDNN on, as the apps set it (apps/common.py): TensorFlow 2.21 turns it on by itself only
# on CPUs with AVX-512 VNNI/BF16 or AMX, so without this the suite would test other kernels
# (and no fused LayerNorm) on other CPUs.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core (scripts/test.sh): one TensorFlow thread pool each, no oversubscription.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import app_process  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(autouse=True)
def _seed_and_clear():
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


# CPU seconds of the heaviest files (full run with forked apps, 2026-12-03 evening).
# scripts/test.sh hands files to its two workers in collection order
# (--no-loadscope-reorder): longest first, so that the workers finish together (xdist's default order, by test count, left the few-test,
# long app files for last: one worker idle for minutes at the end). Unlisted files follow.
HEAVY_FILES = {"test_contract.py": 341, "test_jax_backend.py": 194, "test_training.py": 156,
               "test_readme.py": 146, "test_segmentation_app.py": 144,
               "test_fault_tolerance.py": 138, "test_apps.py": 81, "test_xcit.py": 80,
               "test_benchmark.py": 66, "test_deformable_detr.py": 65, "test_export.py": 62,
               "test_transformer.py": 61, "test_medt.py": 60, "test_vit.py": 60,
               "test_pvt.py": 57, "test_compress_app.py": 56, "test_setr.py": 52,
               "test_precision.py": 60, "test_swin.py": 46, "test_twins.py": 44,
               "test_detr.py": 42}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -HEAVY_FILES.get(os.path.basename(str(item.path)), 0))


_PHASE_START = pytest.StashKey[float]()


def _cpu_seconds():
    """CPU time of this process and of its finished subprocesses (the apps the tests run,
    forked ones included)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (time.process_time() + children.ru_utime + children.ru_stime
            + app_process.forked_cpu_seconds)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report carries its CPU seconds (wall times mislead on a shared machine)."""
    report = (yield).get_result()
    now = _cpu_seconds()
    # In user_properties, which pytest-xdist carries from its workers to the summary.
    report.user_properties.append(("cpu_seconds", now - item.stash.get(_PHASE_START, now)))
    item.stash[_PHASE_START] = now


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_PHASE_START] = _cpu_seconds()


def pytest_terminal_summary(terminalreporter):
    """CPU seconds per test file and the slowest tests by CPU, after --durations' wall times."""
    per_test, per_file = {}, {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            cpu = dict(getattr(report, "user_properties", ())).get("cpu_seconds")
            if cpu is not None and getattr(report, "when", None):
                per_test[report.nodeid] = per_test.get(report.nodeid, 0.0) + cpu
                path = report.nodeid.split("::")[0]
                per_file[path] = per_file.get(path, 0.0) + cpu
    if not per_test:
        return
    if os.environ.get("KERAS_VIT_TEST_CPU_JSON"):  # every test's CPU s, for choosing cuts
        with open(os.environ["KERAS_VIT_TEST_CPU_JSON"], "w") as f:
            json.dump(per_test, f, indent=0, sort_keys=True)
    write = terminalreporter.write_line
    terminalreporter.section("CPU seconds per file (this process and its subprocesses)")
    for path, cpu in sorted(per_file.items(), key=lambda kv: -kv[1]):
        write(f"{cpu:8.1f}  {path}")
    write(f"{sum(per_file.values()):8.1f}  total in tests")
    if not terminalreporter.config.getoption("numprocesses", None):  # not under pytest-xdist
        write(f"{_cpu_seconds():8.1f}  this pytest process in all (imports and collection too)")
    terminalreporter.section("slowest 15 tests by CPU seconds")
    for nodeid, cpu in sorted(per_test.items(), key=lambda kv: -kv[1])[:15]:
        write(f"{cpu:8.1f}  {nodeid}")


def load_fixture_index(family):
    """The parity fixtures tools/make_parity_fixtures.py wrote for a family."""
    with open(os.path.join(FIXTURES, family, "fixtures.json")) as f:
        return json.load(f)


def load_param_counts(family):
    """timm's {name: {params, num_classes}} for the family's full-size variants."""
    with open(os.path.join(FIXTURES, family, "timm_param_counts.json")) as f:
        return json.load(f)


def fixture_path(family, name):
    return os.path.join(FIXTURES, family, name)


def images(batch, size, chans=3, seed=0):
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).standard_normal((batch, h, w, chans)).astype(np.float32)
