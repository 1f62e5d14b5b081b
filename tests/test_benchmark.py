"""apps/benchmark.py end to end on a tiny config, its flag checks, and the TFLite path."""

import csv
import os
import re

import numpy as np
import pytest

import app_process
import keras_vit
from keras_vit import benchmark as bm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "apps", "benchmark.py")
TINY = '{"depth": 2}'


def _run_app(*flags, timeout=240):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    return app_process.run_app(APP, *flags, env=env, timeout=timeout, cwd=ROOT)


def test_app_end_to_end_without_timm(tmp_path):
    out_csv = tmp_path / "bench.csv"
    out_md = tmp_path / "bench.md"
    proc = _run_app("--model=vit_tiny_patch16_224", f"--model_args={TINY}", "--img_size=32",
                    "--batch_size=2", "--modes=tf_function,train", "--warmup=1", "--iters=2",
                    "--rounds=1", "--timm=off", "--onednn=off", "--notrain_jit_compile",
                    f"--csv={out_csv}",
                    f"--markdown={out_md}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| vit_tiny_patch16_224 | keras | tf_function | 32 | 2 |" in proc.stdout
    assert "TF_ENABLE_ONEDNN_OPTS=0" in proc.stdout
    assert re.search(r"CPU flags: .*\b(avx2|avx512f|unknown)\b", proc.stdout), proc.stdout[-2000:]
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [(r["framework"], r["mode"]) for r in rows] == [("keras", "tf_function"),
                                                           ("keras", "train")]
    for r in rows:
        assert float(r["images_per_s"]) > 0 and float(r["peak_rss_mib"]) > 0
        assert r["onednn"] == "off" and r["images_per_s_vs_timm"] == ""
    assert float(rows[0]["latency_ms"]) > 0 and rows[1]["latency_ms"] == ""
    assert "| images/s |" in out_md.read_text()


def test_app_rejects_bad_flags():
    proc = _run_app("--model=vit_not_a_model", "--modes=tf_function", "--timm=off")
    assert proc.returncode != 0
    assert "--model 'vit_not_a_model'" in proc.stderr and "closest: vit_" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run_app("--modes=xla,warp_drive", "--timm=off")  # before TensorFlow loads
    assert proc.returncode != 0 and "warp_drive" in proc.stderr and "tflite_int8" in proc.stderr
    proc = _run_app("--batch_size=0", "--timm=off")
    assert proc.returncode != 0 and "--batch_size must be >= 1" in proc.stderr
    proc = _run_app("--input_pipeline", "--input_modes=folder_plain,disk_plain", "--timm=off")
    assert proc.returncode != 0 and "disk_plain" in proc.stderr
    assert "tfrecord_plain_cached" in proc.stderr and "Traceback" not in proc.stderr


def test_tflite_mode_and_table(tmp_path):
    model = keras_vit.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    bench = bm.KerasBench(model, 32, batch_size=1, threads=1, warmup=1, iters=2,
                          tmp_dir=str(tmp_path))
    res = bench.run("tflite_fp32")
    assert res["images_per_s"] > 0 and res["latency_ms"] > 0 and res["peak_rss_mib"] > 0
    assert "rel. diff" in bench.notes["tflite_fp32"]
    assert sorted(os.listdir(tmp_path)) == [f"{model.name}_none_b1.tflite"]  # B=1: one file
    row = dict(model="m", framework="keras", mode="tflite_fp32", img_size=32, batch_size=1,
               threads=1, onednn="on", images_per_s=res["images_per_s"], latency_ms=None,
               peak_rss_mib=res["peak_rss_mib"], memory_source="ru_maxrss",
               images_per_s_vs_timm=1.25)
    table = bm.markdown_table([row])
    assert "| m | keras | tflite_fp32 | 32 | 1 | 1 | on |" in table and "| 1.25 |" in table
    assert "(ru_maxrss)" in table


def test_timing_helpers():
    calls = []
    times = bm.timed(lambda: calls.append(1), warmup=2, iters=3)
    assert len(times) == 3 and len(calls) == 5
    assert bm.median([3.0, 1.0, 2.0]) == 2.0
    assert bm.timm_importable("/nonexistent/python") is False
    peak, source = bm.peak_rss_mib()
    assert peak > 0 and source in ("VmHWM", "ru_maxrss")
    np.testing.assert_array_equal(bm._inputs(2, (4, 4, 3), 0), bm._inputs(2, (4, 4, 3), 0))


def test_input_pipeline_mode(tmp_path):
    """--input_pipeline on tiny settings: four input modes, the train row and the resume rows
    (the addressed stream measured at step 100,000, the old replay extrapolated there)."""
    out_csv = tmp_path / "input.csv"
    proc = _run_app("--input_pipeline", "--model=vit_tiny_patch16_224",
                    '--model_args={"depth": 1}', "--img_size=32", "--batch_size=4",
                    "--input_modes=folder_plain,folder_mixup,tfrecord_randaugment,"
                    "tfrecord_plain_cached", "--input_images=16", "--input_warmup=0",
                    "--input_batches=1", "--rounds=1",
                    "--resume_steps=0,100000", "--replay_steps=0,1",
                    "--warmup=0", "--iters=1", "--onednn=off",
                    f"--csv={out_csv}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    rates = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] != "mode" and not cells[0].startswith("---"):
            rates[cells[0]] = float(cells[1])
    assert set(rates) == {  # one of each source, augmentation and cache
        "folder plain", "folder mixup 0.8 + cutmix 1.0", "tfrecord randaugment",
        "tfrecord plain cached", "model train step (AdamW)"}, out
    assert all(v > 0 for v in rates.values())
    for source in ("folder", "tfrecord"):
        row = next(line for line in out.splitlines()
                   if line.startswith(f"| {source} | 100,000 (position 400,000) |"))
        addressed, replay = [c.strip() for c in row.strip("|").split("|")][2:4]
        assert float(addressed) > 0  # measured, not extrapolated
        assert "extrapolated" in replay or "not extrapolated" in replay
    assert "CPU flags: " in out and "1-min load average" in out
    assert "| vit_tiny_patch16_224 | keras |" not in out  # no model modes unless --modes
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    modes = {(r["framework"], r["mode"]) for r in rows}
    assert ("input", "tfrecord_plain_cached") in modes and ("keras", "train") in modes
    assert ("resume", "folder_addressed_step_100000") in modes
    assert ("resume", "folder_replay_step_100000") in modes or "not extrapolated" in out


def test_attention_sweep_mode(tmp_path):
    """--attention_sweep on tiny settings, in this one process (--noisolate): a row per
    (kind, length) with positive times, the crossover lines, the PNG and the markdown."""
    png, md = tmp_path / "sweep.png", tmp_path / "sweep.md"
    proc = _run_app("--attention_sweep", "--sequence_lengths=16,64",
                    "--attention_kinds=dense,linear,bigbird,topk", "--attention_dim=32",
                    "--attention_heads=2", "--attention_depth=2", "--topk_k=8",
                    "--bigbird_block_size=8", "--warmup=0", "--iters=1", "--noisolate",
                    f"--plot={png}", f"--markdown={md}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("dense", "linear", "bigbird", "topk"):
            rows[(cells[0], int(cells[1]))] = cells[2:]
    assert set(rows) == {(k, n) for k in ("dense", "linear", "bigbird", "topk")
                         for n in (16, 64)}, proc.stdout
    for cells in rows.values():
        layer_ms, layer_mib, encoder_ms, encoder_mib = (float(c.replace(",", "")) for c in cells)
        assert layer_ms > 0 and encoder_ms > 0  # (printed with thousands separators)
        assert layer_mib >= 0 and encoder_mib >= 0  # in-process: may reuse
    for kind in ("linear", "bigbird"):
        for part in ("layer", "encoder"):
            assert f"{kind} faster than dense ({part}): " in proc.stdout
    assert "CPU flags: " in proc.stdout and "1-min load average" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| kind | N | layer ms |" in md.read_text()


def test_attention_sweep_isolated_by_default():
    """The default (--isolate): each measurement in a fresh interpreter, whose own peak RSS
    above its post-import baseline is the row's memory (here one kind, one length)."""
    from keras_vit import benchmark_attention as ba

    rows = ba.sweep(["linear"], [16], dim=32, num_heads=2, depth=1, warmup=0, iters=1,
                    log=lambda *_, **__: None)
    assert [(r["part"], r["skipped"]) for r in rows] == [("layer", None), ("encoder", None)]
    assert all(r["ms"] > 0 and r["peak_mib"] > 0 for r in rows), rows


def test_attention_sweep_helpers():
    from keras_vit import benchmark_attention as ba

    rows = [dict(kind=k, length=n, part=p, ms=ms, peak_mib=1.0, skipped=None)
            for k, p, n, ms in (("dense", "layer", 100, 1.0), ("dense", "layer", 400, 16.0),
                                ("linear", "layer", 100, 4.0), ("linear", "layer", 400, 4.0),
                                ("dense", "encoder", 100, 1.0), ("linear", "encoder", 100, 2.0))]
    # ratio 4 at 100, 1/4 at 400: log-log crossing half way, at 200
    assert ba.crossover(rows, "linear", "layer").startswith("N ~ 200 ")
    assert ba.crossover(rows, "linear", "encoder").startswith("not within the measured")
    assert ba.crossover(rows, "dense", "encoder", reference="linear").startswith(
        "faster at every measured length")
    assert ba.largest_measured(rows, "linear", "layer") == 400
    assert ba.dense_matrix_bytes(12544, 6) == 12544 ** 2 * 6 * 4
    table = ba.markdown_table(rows + [dict(kind="dense", length=400, part="encoder", ms=None,
                                           peak_mib=None, skipped="skipped: > budget")])
    assert "| dense | 400 | 16.0 | 1.00 | skipped: > budget |  |" in table
    # memory x4 per x2 in N (quadratic) from 1 GiB at N = 1,000: 24 GiB at N ~ 1,000 x sqrt(24)
    grows = [dict(kind="dense", length=n, part="layer", ms=1.0, peak_mib=mib, skipped=None)
             for n, mib in ((500, 256.0), (1000, 1024.0))]
    assert ba.fits_in(grows, "dense", "layer") == int(1000 * 24 ** 0.5)
    assert ba.fits_in(grows[:1], "dense", "layer") is None  # one point: no line


def test_model_on_tokens_is_timed_on_its_own_input_shape(tmp_path):
    """A model that takes tokens, not images (a saved chain of linear layers, as in
    benchmarks/README.md's int8 bound), runs in every TFLite mode on its (N, C) inputs."""
    import keras

    tokens = keras.Input((5, 16), name="tokens")
    model = keras.Model(tokens, keras.layers.Dense(16)(keras.layers.Dense(32)(tokens)))
    assert bm.input_shape(model, 5) == (5, 16)
    bench = bm.KerasBench(model, 5, batch_size=2, threads=1, warmup=1, iters=2,
                          tmp_dir=str(tmp_path))
    assert bench.x_batch.shape == (2, 5, 16) and bench.x_one.shape == (1, 5, 16)
    for mode in ("tf_function", "tflite_fp32", "tflite_dynamic", "tflite_int8"):
        res = bench.run(mode)
        assert res["images_per_s"] > 0 and res["latency_ms"] > 0, mode
    assert bench.notes["size_int8"] < bench.notes["size_none"]
    image = keras_vit.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    assert bm.input_shape(image, 32) == (32, 32, 3)
    a, b = keras.Input((4,)), keras.Input((4,))
    with pytest.raises(ValueError, match="single-input models; .* has 2 inputs"):
        bm.input_shape(keras.Model([a, b], keras.layers.Add()([a, b])), 4)
