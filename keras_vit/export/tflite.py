"""TFLite export with builtin ops only (fp32, fp16, dynamic range, full int8), verified with LiteRT."""

import os
import re

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from keras_vit.export.atomic import atomic_path
from keras_vit.export.saved_model import input_specs

QUANTIZATION_MODES = ("none", "float16", "dynamic", "int8")

# Tolerances a verified export must meet (relative to the Keras output's scale for
# float modes; top-1 agreement on the representative data for integer modes).
FLOAT_TOLERANCE = {"none": 1e-4, "float16": 1e-2}
MIN_TOP1_AGREEMENT = {"dynamic": 0.9, "int8": 0.9}


class TFLiteExportError(RuntimeError):
    """The converter needed non-builtin ops, or the exported file disagrees with Keras."""


def _as_batches(data, batch_size):
    """Representative data (array or iterable of arrays/lists) as a list of per-input batches."""
    if isinstance(data, np.ndarray) or hasattr(data, "numpy"):
        data = np.asarray(data)
        return [[data[i:i + batch_size]] for i in range(0, len(data) - batch_size + 1, batch_size)]
    batches = []
    for item in data:
        arrays = item if isinstance(item, (list, tuple)) else [item]
        arrays = [np.asarray(a, np.float32) for a in arrays]
        for i in range(0, len(arrays[0]) - batch_size + 1, batch_size):
            batches.append([a[i:i + batch_size] for a in arrays])
    return batches


def _flex_ops(message):
    ops = set(re.findall(r"\b(Flex\w+)", message))
    ops |= {f"tf.{m}" for m in re.findall(r"\btf\.([A-Z]\w+)", message)}
    return sorted(ops)


def convert(model, quantization="none", representative_data=None, batch_size=1, int8_io=False):
    """The .tflite flatbuffer of ``model`` (bytes). Builtin TFLite ops only."""
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}, got {quantization!r}")
    if quantization == "int8" and representative_data is None:
        raise ValueError("int8 quantization is full integer and needs representative_data "
                         "(a few hundred images like those the model will see) to calibrate "
                         "activation ranges")
    specs = input_specs(model, batch_size)
    if len(specs) == 1:
        fn = tf.function(lambda x: model(x, training=False), input_signature=specs)
    else:
        fn = tf.function(lambda *xs: model(list(xs), training=False), input_signature=specs)
    # Weights frozen into constants: left as resource variables, LiteRT reads them
    # uninitialised (READ_VARIABLE gives garbage) under TF 2.21.
    frozen = convert_variables_to_constants_v2(fn.get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantization == "int8":
        batches = _as_batches(representative_data, batch_size)
        if not batches:
            raise ValueError(f"representative_data holds fewer than batch_size={batch_size} samples")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([np.asarray(a, np.float32) for a in b]
                                                    for b in batches)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    try:
        return converter.convert()
    except Exception as e:  # the converter raises ConverterError with the op list in its text
        ops = _flex_ops(str(e))
        what = f"needs non-builtin ops {', '.join(ops)}" if ops else "failed"
        raise TFLiteExportError(f"TFLite conversion of {model.name!r} ({quantization}) {what}:\n"
                                f"{str(e)[-2000:]}") from e


class LiteRTRunner:
    """Runs a .tflite file with ai_edge_litert, handling int8 input/output (de)quantisation."""

    def __init__(self, path, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=os.fspath(path), num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()

    def __call__(self, *arrays):
        if len(arrays) != len(self.inputs):
            raise ValueError(f"the model takes {len(self.inputs)} inputs, got {len(arrays)}")
        # TFLite orders inputs by its own rule; match Keras inputs by name, then by position.
        order = sorted(range(len(self.inputs)), key=lambda i: self.inputs[i]["name"])
        if len(arrays) == 1:
            order = [0]
        for detail, array in zip([self.inputs[i] for i in order], arrays):
            array = np.asarray(array, np.float32)
            if detail["dtype"] in (np.int8, np.uint8):
                scale, zero = detail["quantization"]
                array = np.clip(np.round(array / scale + zero), -128, 127)
            self.interpreter.set_tensor(detail["index"], array.astype(detail["dtype"]))
        self.interpreter.invoke()
        outs = []
        for detail in self.outputs:
            out = self.interpreter.get_tensor(detail["index"])
            if detail["dtype"] in (np.int8, np.uint8):
                scale, zero = detail["quantization"]
                out = (out.astype(np.float32) - zero) * scale
            outs.append(out.astype(np.float32))
        return outs[0] if len(outs) == 1 else outs


def verify_tflite(path, model, inputs):
    """Runs the .tflite file on ``inputs`` (N samples, the file's batch size divides N) and
    compares with Keras. Returns max_abs_diff, relative_diff (to the Keras output's max
    magnitude), top1_agreement and size_bytes."""
    runner = LiteRTRunner(path)
    batch = runner.inputs[0]["shape"][0]
    inputs = np.asarray(inputs, np.float32)
    if len(inputs) % batch:
        raise ValueError(f"{len(inputs)} verification samples do not split into batches of {batch}")
    lite = np.concatenate([np.reshape(runner(inputs[i:i + batch]), (batch, -1))
                           for i in range(0, len(inputs), batch)])
    ref = np.reshape(np.asarray(model(inputs, training=False)), (len(inputs), -1))
    diff = float(np.max(np.abs(lite - ref)))
    scale = float(max(np.max(np.abs(ref)), 1e-12))
    return dict(max_abs_diff=diff, relative_diff=diff / scale,
                top1_agreement=float(np.mean(lite.argmax(-1) == ref.argmax(-1))),
                size_bytes=os.path.getsize(path))


def _verification_inputs(model, representative_data, batch_size, n=8, seed=0):
    if representative_data is not None:
        samples = np.concatenate([b[0] for b in _as_batches(representative_data, batch_size)])
        return samples[: max(batch_size, len(samples) // batch_size * batch_size)]
    shape = tuple(model.inputs[0].shape[1:])
    n = max(batch_size, n // batch_size * batch_size)
    return np.random.default_rng(seed).standard_normal((n,) + shape).astype(np.float32)


def export_tflite(model, path, quantization="none", representative_data=None, batch_size=1,
                  verify=True, int8_io=False):
    """Converts ``model`` to a builtin-only .tflite file at ``path`` and verifies it.

    quantization: "none" (fp32), "float16", "dynamic" (int8 weights) or "int8"
    (full integer; needs ``representative_data``). The file is written
    atomically and only once it passes verification (fp32: max abs diff <=
    1e-4 of the output scale; fp16: 1e-2; dynamic/int8: top-1 agreement >= 0.9
    on the representative data), so an existing file is never replaced by a
    bad one. Returns the verification report (dict).
    """
    if verify and len(model.inputs) != 1:
        raise ValueError("verification covers single-input models; pass verify=False")
    flatbuffer = convert(model, quantization, representative_data, batch_size, int8_io)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(flatbuffer)
        report = dict(quantization=quantization, size_bytes=len(flatbuffer), path=os.fspath(path))
        if verify:
            inputs = _verification_inputs(model, representative_data, batch_size)
            report.update(verify_tflite(tmp, model, inputs))
            if quantization in FLOAT_TOLERANCE:
                if report["relative_diff"] > FLOAT_TOLERANCE[quantization]:
                    raise TFLiteExportError(
                        f"{quantization} TFLite output differs from Keras by "
                        f"{report['relative_diff']:.2e} of the output scale "
                        f"(tolerance {FLOAT_TOLERANCE[quantization]:.0e}); file not written")
            elif report["top1_agreement"] < MIN_TOP1_AGREEMENT[quantization]:
                raise TFLiteExportError(
                    f"{quantization} TFLite top-1 agreement with Keras is "
                    f"{report['top1_agreement']:.2f} (< {MIN_TOP1_AGREEMENT[quantization]}); "
                    "file not written")
    return report
