import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import images
from keras_vit.export import TFLiteExportError, export_saved_model, export_tflite, verify_tflite
from keras_vit.export import tflite as tflite_module
from keras_vit.models.vit import vision_transformer

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=4)


def colour_task(n, seed):
    """Noise images tinted by their class (red, green, blue or dark): learnable in seconds."""
    x = 0.5 * images(n, 32, seed=seed)
    y = np.random.default_rng(seed).integers(0, 4, n)
    for i, c in enumerate(y):
        if c < 3:
            x[i, ..., c] += 1.0
        else:
            x[i] -= 1.0
    return x, y


@pytest.fixture(scope="module")
def small_vit():
    """A small ViT trained to clear logit margins: quantisation agreement is only meaningful
    on trained weights (random ones have near-tied logits)."""
    keras.utils.set_random_seed(0)
    model = vision_transformer(**SMALL)
    x, y = colour_task(512, seed=1)
    model.compile(keras.optimizers.AdamW(2e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=3, batch_size=64, verbose=0)
    assert model.evaluate(*colour_task(256, seed=2), verbose=0)[1] > 0.9
    return model


def test_saved_model_serves_the_same_logits(small_vit, tmp_path):
    path = os.path.join(tmp_path, "sm")
    export_saved_model(small_vit, path)
    loaded = tf.saved_model.load(path)
    x = images(3, 32)
    np.testing.assert_allclose(loaded.serve(x).numpy(), np.asarray(small_vit(x)), atol=1e-5)
    sig = loaded.signatures["serving_default"]
    out = list(sig(images=tf.constant(x)).values())[0]
    np.testing.assert_allclose(out.numpy(), np.asarray(small_vit(x)), atol=1e-5)


def test_saved_model_export_is_atomic(small_vit, tmp_path, monkeypatch):
    path = os.path.join(tmp_path, "sm")
    export_saved_model(small_vit, path)
    before = sorted(os.listdir(path))

    class FailingArchive:
        """Writes part of an export, then fails, like a full disk."""

        def track(self, model):
            pass

        def add_endpoint(self, *args, **kwargs):
            pass

        def write_out(self, path, **kwargs):
            os.makedirs(os.path.join(path, "variables"))
            raise RuntimeError("disk full")

    monkeypatch.setattr(keras.export, "ExportArchive", FailingArchive)
    with pytest.raises(RuntimeError, match="disk full"):
        export_saved_model(small_vit, path)
    assert sorted(os.listdir(path)) == before
    assert tf.saved_model.load(path).serve(images(1, 32)).shape == (1, 4)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp left


@pytest.mark.parametrize("mode,max_rel", [("none", 1e-4), ("float16", 1e-2), ("dynamic", None),
                                          ("int8", None)])
def test_tflite_modes_are_verified(small_vit, tmp_path, mode, max_rel):
    data = colour_task(32, seed=3)[0]
    path = os.path.join(tmp_path, f"{mode}.tflite")
    report = export_tflite(small_vit, path, quantization=mode, representative_data=data)
    assert os.path.getsize(path) == report["size_bytes"]
    if max_rel is not None:
        assert report["relative_diff"] <= max_rel
    assert report["top1_agreement"] >= 0.9
    # The report is reproducible from the file alone.
    again = verify_tflite(path, small_vit, data[:8])
    assert again["top1_agreement"] >= 0.9
    # LiteRT's own signature API (what Android's runSignature and ai-edge-quantizer use)
    # runs the file: one "serving_default" signature, the Keras input name, output_0.
    from ai_edge_litert.interpreter import Interpreter

    from keras_vit.export.tflite import LiteRTRunner, input_names

    interpreter = Interpreter(model_path=path)
    (name,) = input_names(small_vit)
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": [name], "outputs": ["output_0"]}}
    out = interpreter.get_signature_runner("serving_default")(**{name: data[:1]})["output_0"]
    np.testing.assert_array_equal(out, LiteRTRunner(path)(data[:1]))


def test_quantized_files_are_smaller(small_vit, tmp_path):
    data = images(8, 32, seed=4)
    sizes = {m: export_tflite(small_vit, os.path.join(tmp_path, f"{m}.tflite"), quantization=m,
                              representative_data=data, verify=False)["size_bytes"]
             for m in ("none", "float16", "dynamic", "int8")}
    assert sizes["float16"] < 0.6 * sizes["none"]
    assert sizes["dynamic"] < 0.4 * sizes["none"]
    assert sizes["int8"] < 0.4 * sizes["none"]


def test_int8_needs_representative_data(small_vit, tmp_path):
    with pytest.raises(ValueError, match="representative_data"):
        export_tflite(small_vit, os.path.join(tmp_path, "x.tflite"), quantization="int8")
    with pytest.raises(ValueError, match="quantization must be one of"):
        export_tflite(small_vit, os.path.join(tmp_path, "x.tflite"), quantization="int4")
    assert not os.path.exists(os.path.join(tmp_path, "x.tflite"))


def test_int8_io_file_runs(small_vit, tmp_path):
    data = colour_task(32, seed=5)[0]
    report = export_tflite(small_vit, os.path.join(tmp_path, "io.tflite"), quantization="int8",
                           representative_data=data, int8_io=True)
    assert report["top1_agreement"] >= 0.9


def test_failed_verification_keeps_the_existing_file(small_vit, tmp_path, monkeypatch):
    path = os.path.join(tmp_path, "m.tflite")
    export_tflite(small_vit, path)
    with open(path, "rb") as f:
        good = f.read()
    monkeypatch.setitem(tflite_module.FLOAT_TOLERANCE, "none", 0.0)
    other = vision_transformer(**dict(SMALL, num_classes=4))
    with pytest.raises(TFLiteExportError, match="file not written"):
        export_tflite(other, path)
    with open(path, "rb") as f:
        assert f.read() == good


@keras.saving.register_keras_serializable(package="keras_vit_tests")
class Inverse(keras.layers.Layer):
    def call(self, x):
        return keras.ops.linalg.inv(x + 3.0)


def test_non_builtin_ops_are_named(tmp_path):
    inputs = keras.Input((8, 8))
    model = keras.Model(inputs, Inverse()(inputs))
    with pytest.raises(TFLiteExportError, match=r"needs non-builtin ops tf\.MatrixInverse\b"):
        export_tflite(model, os.path.join(tmp_path, "inv.tflite"))
    assert not os.path.exists(os.path.join(tmp_path, "inv.tflite"))


@keras.saving.register_keras_serializable(package="keras_vit_tests")
class Roll(keras.layers.Layer):
    def call(self, x):
        return keras.ops.roll(x, 3, axis=1)


def test_roll_lowers_to_builtin_slices(tmp_path):
    """At a fixed batch the converter turns tf.roll into SLICE + CONCATENATION (no FlexRoll)."""
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, Roll()(inputs))
    report = export_tflite(model, os.path.join(tmp_path, "roll.tflite"))
    assert report["max_abs_diff"] == 0.0


def test_batch_size_is_fixed_in_the_file(small_vit, tmp_path):
    path = os.path.join(tmp_path, "b4.tflite")
    report = export_tflite(small_vit, path, batch_size=4)
    assert report["relative_diff"] <= 1e-4
    from keras_vit.export.tflite import LiteRTRunner

    assert list(LiteRTRunner(path).inputs[0]["shape"]) == [4, 32, 32, 3]


# --- multi-output and multi-input models -------------------------------------------------

PVT_FEATURES = dict(img_size=64, embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 2, 4),
                    mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1), features_only=True)


def test_features_only_pyramid_is_verified_per_output(tmp_path):
    from keras_vit.models.pvt import pyramid_vision_transformer_v2

    keras.utils.set_random_seed(0)
    model = pyramid_vision_transformer_v2(**PVT_FEATURES)
    report = export_tflite(model, os.path.join(tmp_path, "pyramid.tflite"), batch_size=2)
    # One row per stage map, in the Keras output order (TFLite lists them in another order).
    assert list(report["outputs"]) == [f"output_{i}" for i in range(4)]
    assert [r["shape"] for r in report["outputs"].values()] == [
        [8, 16, 16, 8], [8, 8, 8, 16], [8, 4, 4, 24], [8, 2, 2, 32]]
    for row in report["outputs"].values():
        assert row["relative_diff"] <= 1e-4 and "top1_agreement" not in row
    assert report["top1_agreement"] is None
    assert report["relative_diff"] == max(r["relative_diff"] for r in report["outputs"].values())


def detection_like(boxes_scale=1.0, seed=0):
    """Two named inputs (an image and an auxiliary vector), dict outputs as detection heads
    return them (boxes per query, class scores); "pred_boxes" sorts after "logits" but is
    built first."""
    keras.utils.set_random_seed(seed)
    image, aux = keras.Input((16, 16, 3), name="image"), keras.Input((5,), name="aux")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3)(image))
    boxes = keras.layers.Reshape((3, 4))(keras.layers.Dense(12, name="boxes")(pooled))
    boxes = keras.layers.Rescaling(boxes_scale)(boxes)
    logits = keras.layers.Dense(6, name="logits")(keras.layers.Concatenate()([pooled, aux]))
    return keras.Model({"image": image, "aux": aux}, {"pred_boxes": boxes, "logits": logits})


def test_dict_outputs_and_named_inputs_are_verified(tmp_path):
    model = detection_like()
    rng = np.random.default_rng(0)
    data = {"image": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
            "aux": rng.standard_normal((8, 5)).astype(np.float32)}
    path = os.path.join(tmp_path, "det.tflite")
    report = export_tflite(model, path, representative_data=[data])
    assert set(report["outputs"]) == {"logits", "pred_boxes"}
    assert report["outputs"]["logits"]["shape"] == [8, 6]
    assert report["outputs"]["pred_boxes"]["shape"] == [8, 3, 4]
    assert report["outputs"]["logits"]["top1_agreement"] == 1.0
    assert "top1_agreement" not in report["outputs"]["pred_boxes"]  # not class scores
    assert report["relative_diff"] <= 1e-4
    # Fed by name: the file's inputs are the Keras input names, whatever their order.
    from keras_vit.export.tflite import LiteRTRunner

    runner = LiteRTRunner(path)
    assert sorted(runner.named_inputs) == ["aux", "image"]
    one = {k: v[:1] for k, v in data.items()}
    logits, boxes = runner(aux=one["aux"], image=one["image"])  # flattened: sorted keys
    expected = model(one)
    np.testing.assert_allclose(logits, np.asarray(expected["logits"]), atol=1e-5)
    np.testing.assert_allclose(boxes, np.asarray(expected["pred_boxes"]), atol=1e-5)
    # The same file through LiteRT's signature runner: inputs by Keras name, outputs output_0,
    # output_1 in the flattened (sorted-key) order; the same kernels, so exactly the runner's
    # outputs (checked against Keras just above).
    from ai_edge_litert.interpreter import Interpreter

    signature = Interpreter(model_path=path).get_signature_runner("serving_default")
    out = signature(aux=one["aux"], image=one["image"])
    assert sorted(out) == ["output_0", "output_1"]
    np.testing.assert_array_equal(out["output_0"], logits)
    np.testing.assert_array_equal(out["output_1"], boxes)


def test_a_wrong_output_fails_verification(tmp_path, monkeypatch):
    """A file whose boxes head disagrees with Keras (the weights of a model scaled by 1.01
    there, the logits identical) fails on that output alone and is not written."""
    model = detection_like()
    wrong = detection_like(boxes_scale=1.01)
    wrong.set_weights(model.get_weights())
    path = os.path.join(tmp_path, "det.tflite")
    real_convert = tflite_module.convert
    monkeypatch.setattr(tflite_module, "convert", lambda m, *a, **k: real_convert(wrong, *a, **k))
    with pytest.raises(TFLiteExportError, match=r"output 'pred_boxes' differs") as error:
        export_tflite(model, path)
    assert "'logits'" not in str(error.value) and "file not written" in str(error.value)
    assert not os.path.exists(path)
    # The same file verified against the model it came from passes: the check is the outputs.
    monkeypatch.undo()
    rng = np.random.default_rng(1)
    inputs = {"image": rng.standard_normal((2, 16, 16, 3)).astype(np.float32),
              "aux": rng.standard_normal((2, 5)).astype(np.float32)}
    export_tflite(wrong, path)
    report = verify_tflite(path, model, inputs)
    assert report["outputs"]["logits"]["relative_diff"] <= 1e-5
    assert 1e-3 < report["outputs"]["pred_boxes"]["relative_diff"] < 2e-2


def test_converter_console_output_is_captured(small_vit, tmp_path, capfd):
    """The converter's C++ calibrator prints "fully_quantize: 0, inference_type: 6, ..." and
    LiteRT "Created TensorFlow Lite XNNPACK delegate" on the process's own stdout/stderr:
    neither reaches the console, and an int8 export gives the same file every time for the
    same calibration images."""
    data = colour_task(32, seed=5)[0]
    capfd.readouterr()
    first = export_tflite(small_vit, os.path.join(tmp_path, "a.tflite"), quantization="int8",
                          representative_data=data)
    second = export_tflite(small_vit, os.path.join(tmp_path, "b.tflite"), quantization="int8",
                           representative_data=data)
    out, err = capfd.readouterr()
    for noise in ("fully_quantize", "inference_type", "XNNPACK"):
        assert noise not in out + err, (noise, out + err)
    with open(first["path"], "rb") as a, open(second["path"], "rb") as b:
        assert a.read() == b.read()
    assert first["top1_agreement"] == second["top1_agreement"] >= 0.9


def test_a_failed_conversion_reports_the_converters_output(tmp_path, monkeypatch):
    def failing_convert(self):
        os.write(1, b"native converter line\n")  # as the C++ code writes: to the fd
        raise RuntimeError("converter failed")

    model = vision_transformer(**dict(SMALL, depth=1))
    monkeypatch.setattr(tf.lite.TFLiteConverter, "convert", failing_convert)
    with pytest.raises(TFLiteExportError, match=r"(?s)converter failed.*native converter line"):
        export_tflite(model, os.path.join(tmp_path, "x.tflite"))


def postprocessed_toy_detector(seed=0):
    """16 queries (4x4 patches of a 32 px image) with softmax scores over 4 classes +
    no-object and sigmoid boxes, followed by DETR's post-processing: the outputs a detection
    export has (scores, classes, xyxy pixel boxes), confident enough to quantize."""
    from keras_vit.detection.postprocess import postprocess

    keras.utils.set_random_seed(seed)
    image = keras.Input((32, 32, 3), name="images")
    tokens = keras.layers.Reshape((16, 24))(keras.layers.Conv2D(24, 8, strides=8)(image))
    logits = keras.layers.Rescaling(4.0)(keras.layers.Dense(5)(tokens))
    boxes = keras.layers.Dense(4, activation="sigmoid")(tokens)
    found = postprocess({"logits": logits, "pred_boxes": boxes}, (32, 32), top_k=8)
    return keras.Model(image, found)


def test_detection_agreement_matches_by_content_not_rank():
    from keras_vit.export.tflite import detection_agreement

    ref = dict(scores=np.array([[0.9, 0.5, 0.5, 0.1]]), classes=np.array([[1, 2, 3, 0]]),
               boxes=np.array([[[0, 0, 10, 10], [5, 5, 9, 9], [1, 1, 2, 2], [0, 0, 1, 1]]],
                              np.float32))
    swapped = {k: v[:, [0, 2, 1, 3]] for k, v in ref.items()}  # a tie listed the other way
    assert detection_agreement(ref, swapped, (64, 64)) == 1.0
    moved = dict(ref, boxes=ref["boxes"] + np.array([0, 0, 0.2, 0], np.float32))  # 0.3% of 64
    assert detection_agreement(ref, moved, (64, 64)) == 0.0  # the cut's 0.1 not checked
    assert detection_agreement(ref, moved, (64, 64), "int8") == 1.0  # a few pixels: fine
    relabelled = dict(ref, classes=np.array([[1, 2, 0, 0]]))
    assert detection_agreement(ref, relabelled, (64, 64)) == 2 / 3
    assert detection_agreement(ref, relabelled, (64, 64), "int8") == 2 / 3  # scores >= 0.3
    unsure = dict(ref, scores=np.full((1, 4), 0.2))
    assert detection_agreement(unsure, unsure, (64, 64)) is None  # all tied
    assert detection_agreement(unsure, unsure, (64, 64), "int8") is None  # none confident


def test_postprocessed_detector_exports_verified_in_every_mode(tmp_path):
    """fp32, dynamic and int8 files of a detector with its post-processing: judged by the
    detections they reproduce (same class, box within 1e-3 of the image size in fp32, 5% when
    quantized), and a file that loses them is refused and not written."""
    model = postprocessed_toy_detector()
    data = images(32, 32, seed=3)
    reports = {}
    for mode in ("none", "dynamic", "int8"):
        reports[mode] = export_tflite(model, os.path.join(tmp_path, f"{mode}.tflite"), mode,
                                      representative_data=data)
        assert set(reports[mode]["outputs"]) == {"boxes", "classes", "scores"}
        assert reports[mode]["top1_agreement"] is None  # ranked detections are no class scores
    assert reports["none"]["detection_agreement"] == 1.0
    assert reports["none"]["outputs"]["boxes"]["max_abs_diff"] <= 1e-3 * 32
    assert reports["dynamic"]["detection_agreement"] >= 0.9
    assert reports["int8"]["detection_agreement"] >= 0.9
    # A file whose class head differs (scaled weights) loses detections: refused.
    wrong = postprocessed_toy_detector()
    weights = model.get_weights()
    wrong.set_weights([w * 1.5 if w.shape == (24, 5) else w for w in weights])
    path = os.path.join(tmp_path, "wrong.tflite")
    real_convert = tflite_module.convert
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tflite_module, "convert", lambda m, *a, **k: real_convert(wrong, *a, **k))
        with pytest.raises(TFLiteExportError, match=r"reproduces .*% of Keras' detections"):
            export_tflite(model, path)
    assert not os.path.exists(path)


def _op_input_types(path):
    """{op name: set of its first input's dtype names} of a .tflite file."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    types = {}
    for op in interpreter._get_ops_details():
        types.setdefault(op["op_name"], set()).add(dtypes[op["inputs"][0]])
    return types


def test_int8_mixed_keeps_normalisation_and_softmax_float(small_vit, tmp_path):
    """Matmuls and convolutions in int8, LayerNorm/softmax/GELU in float, verified on held-out
    images; what the search kept float is in the report, and its last agreement is the one
    the verification measured on the same images."""
    calibration, held_out = colour_task(64, seed=6)[0], colour_task(96, seed=7)[0]
    path = os.path.join(tmp_path, "mixed.tflite")
    report = export_tflite(small_vit, path, quantization="int8_mixed",
                           representative_data=calibration, verification_data=held_out)
    mixed = report["mixed_precision"]
    assert mixed["int8_ops"] == ["FULLY_CONNECTED", "CONV_2D"]
    groups = set(mixed["float_groups"]) | set(mixed["int8_groups"])
    assert {"patch_embed/proj", "blocks/attn/qkv", "blocks/mlp/fc2", "output"} <= groups
    assert mixed["search"][-1]["agreement"] == report["top1_agreement"]
    assert report["top1_agreement"] >= tflite_module.MIXED_TARGET_AGREEMENT or not mixed[
        "int8_groups"]
    types = _op_input_types(path)
    for op in ("SOFTMAX", "GELU", "RSQRT", "BATCH_MATMUL"):
        assert types[op] == {"float32"}, (op, types[op])
    if mixed["int8_groups"]:
        assert "int8" in types["FULLY_CONNECTED"] | types.get("CONV_2D", set())
    assert report["size_bytes"] < 0.6 * len(tflite_module.convert(small_vit, "none"))


def _weight_types(path, op_name):
    """{output tensor name: weight (input 1) dtype name} of the file's ``op_name`` ops."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    return {tensors[op["outputs"][0]]["name"]: np.dtype(tensors[op["inputs"][1]]["dtype"]).name
            for op in interpreter._get_ops_details() if op["op_name"] == op_name}


def test_dynamic_mixed_puts_groups_back_in_float_until_it_agrees(small_vit, tmp_path,
                                                               monkeypatch):
    """dynamic_mixed is dynamic range while that agrees (this model: 100%), and with a target
    no int8 weight can meet, every layer group goes back to float: the file then computes
    what the fp32 file does, its int8 copies gone from the file."""
    calibration, held_out = colour_task(64, seed=6)[0], colour_task(96, seed=7)[0]
    dynamic = export_tflite(small_vit, os.path.join(tmp_path, "dynamic.tflite"), "dynamic",
                            verification_data=held_out)
    path = os.path.join(tmp_path, "dynamic_mixed.tflite")
    report = export_tflite(small_vit, path, "dynamic_mixed", representative_data=calibration,
                           verification_data=held_out)
    mixed = report["mixed_precision"]
    assert dynamic["top1_agreement"] >= tflite_module.DYNAMIC_MIXED_TARGET_AGREEMENT
    # searched on the calibration and held-out images together (160), verified on the 96
    assert mixed["float_groups"] == [] and mixed["search"][0]["agreement"] >= (
        tflite_module.DYNAMIC_MIXED_TARGET_AGREEMENT)
    assert report["top1_agreement"] == dynamic["top1_agreement"]
    assert report["max_abs_diff"] == dynamic["max_abs_diff"]  # the same file
    assert _weight_types(path, "FULLY_CONNECTED") == _weight_types(
        os.path.join(tmp_path, "dynamic.tflite"), "FULLY_CONNECTED")
    assert "int8" in _weight_types(path, "FULLY_CONNECTED").values()

    monkeypatch.setattr(tflite_module, "DYNAMIC_MIXED_TARGET_AGREEMENT", 1.01)
    report = export_tflite(small_vit, path, "dynamic_mixed", verification_data=held_out)
    mixed = report["mixed_precision"]
    assert mixed["int8_groups"] == [] and len(mixed["search"]) == len(mixed["float_groups"]) + 1
    assert {"patch_embed/proj", "blocks/attn/qkv", "blocks/mlp/fc2"} <= set(mixed["float_groups"])
    fp32 = export_tflite(small_vit, os.path.join(tmp_path, "fp32.tflite"), "none",
                         verification_data=held_out)
    assert set(_weight_types(path, "FULLY_CONNECTED").values()) == {"float32"}
    # the fp32 file's tolerance: float weights, float activations
    assert report["relative_diff"] <= tflite_module.FLOAT_TOLERANCE["none"]
    assert report["size_bytes"] <= 1.01 * fp32["size_bytes"]


def test_dynamic_mixed_keeps_the_chosen_group_float(small_vit, tmp_path):
    """Given back its float weights, a group's ops are float ops, the others stay int8, and
    the file still runs and agrees."""
    data = colour_task(32, seed=3)[0]
    float_file = tflite_module.convert(small_vit, "none")
    groups, _ = tflite_module._matmul_groups(float_file)
    dynamic = tflite_module.convert(small_vit, "dynamic")
    qkv = tflite_module._with_float_weights(dynamic, float_file, set(groups["blocks/attn/qkv"]))
    paths = {}
    for name, flatbuffer in (("dynamic", dynamic), ("qkv_float", qkv)):
        paths[name] = os.path.join(tmp_path, f"{name}.tflite")
        with open(paths[name], "wb") as f:
            f.write(flatbuffer)
    before = _weight_types(paths["dynamic"], "FULLY_CONNECTED")
    after = _weight_types(paths["qkv_float"], "FULLY_CONNECTED")
    changed = {n for n in before if before[n] != after[n]}
    assert changed == set(groups["blocks/attn/qkv"]) and {after[n] for n in changed} == {
        "float32"} and {before[n] for n in changed} == {"int8"}
    assert len(qkv) > len(dynamic)
    assert verify_tflite(paths["qkv_float"], small_vit, data)["top1_agreement"] >= 0.9


def test_dynamic_mixed_searches_on_the_calibration_images_too(small_vit):
    """dynamic_mixed calibrates nothing: its search scores on the representative and the
    held-out images together (a steadier decision); int8_mixed's on the held-out alone."""
    calibration, held_out = colour_task(64, seed=6)[0], colour_task(96, seed=7)[0]
    for mode, n in (("dynamic_mixed", 160), ("int8_mixed", 96)):
        inputs = tflite_module._search_inputs(small_vit, mode, calibration, held_out, 1)
        assert len(inputs) == 1 and len(inputs[0]) == n
    np.testing.assert_array_equal(tflite_module._search_inputs(
        small_vit, "dynamic_mixed", calibration, held_out, 1)[0], np.concatenate(
            [calibration, held_out]))
    assert len(tflite_module._search_inputs(small_vit, "dynamic_mixed", calibration, None,
                                            1)[0]) == 64
