"""TFLite export with builtin ops only (fp32, fp16, dynamic range, full int8), verified with LiteRT."""

import collections
import contextlib
import os
import re
import tempfile

import numpy as np
import tensorflow as tf

from keras_vit.export.atomic import atomic_path
from keras_vit.export.saved_model import call_on_inputs, input_specs
from keras_vit.layers.common import unfused_norms

QUANTIZATION_MODES = ("none", "float16", "dynamic", "dynamic_mixed", "int8", "int8_mixed")
# int8_mixed: the ops that hold a vision transformer's FLOPs in int8 (XNNPACK runs them as
# QS8 kernels); LayerNorm, softmax, GELU, attention's batch matmuls and the residual adds in
# float32. Measured on the main job's model (1,000 held-out images): full int8 agreed with
# Keras on 93.3% of top-1 at 2.4x fp32's latency; LayerNorm in float 95.8%; these two ops
# alone in int8 98.6%, faster than fp32. The last point or so comes from keeping the layer
# groups whose int8 costs the most agreement in float (MIXED_TARGET_AGREEMENT, greedy).
MIXED_INT8_OPS = ("FULLY_CONNECTED", "CONV_2D")
MIXED_TARGET_AGREEMENT = 0.99
# dynamic_mixed: dynamic range (int8 weights, activations quantized per call), then the layer
# groups whose int8 weights cost the most agreement back to float32 weights until the file
# agrees with Keras this often (the bar for dynamic range). On the DeiT-S-size edge
# model dynamic range agreed on 99.3% of 1,000 validation images; with the stem's
# convolutions float, on 99.9%, at 1.04x its latency (benchmarks/README.md).
DYNAMIC_MIXED_TARGET_AGREEMENT = 0.995
# The apps calibrate on the first CALIBRATION_IMAGES images of the validation split and
# verify on up to HELD_OUT_IMAGES after them: the same files every run, and an agreement
# measured on images the calibration did not see.
CALIBRATION_IMAGES = 256
HELD_OUT_IMAGES = 512


def calibration_split(images, calibration=CALIBRATION_IMAGES):
    """(calibration images, held-out verification images or None when there are none)."""
    if images is None:
        return None, None
    held_out = images[calibration:calibration + HELD_OUT_IMAGES]
    return images[:calibration], (held_out if len(held_out) else None)

# Tolerances a verified export must meet (relative to the Keras output's scale for
# float modes; top-1 agreement on the representative data for integer modes).
FLOAT_TOLERANCE = {"none": 1e-4, "float16": 1e-2}
MIN_TOP1_AGREEMENT = {"dynamic": 0.9, "dynamic_mixed": 0.9, "int8": 0.9, "int8_mixed": 0.9}
# Integer modes, outputs that are not class scores (feature maps, boxes): the largest
# difference relative to the output's scale (a small random PVT v2 pyramid measured up to
# 0.05 dynamic, 0.20 int8 on its first stage).
MAX_QUANTIZED_RELATIVE_DIFF = {"dynamic": 0.1, "dynamic_mixed": 0.1, "int8": 0.3,
                               "int8_mixed": 0.3}
# Segmentation logits (N, H, W, K): the per-pixel argmax must agree this often (float modes
# as well as the relative bound; integer modes instead of it).
MIN_PIXEL_AGREEMENT = {"none": 0.99, "float16": 0.99, "dynamic": 0.9, "dynamic_mixed": 0.9,
                       "int8": 0.9, "int8_mixed": 0.9}
# Post-processed detectors ({"scores", "classes", "boxes"} in input pixels): the share of
# Keras' detections that the file finds with the same class, the box within this fraction
# of the image size and the score within this much. Float modes check every detection
# inside the top-k (1e-3 of the image size, the contract); quantized modes those the
# model is confident of (score >= DETECTION_SCORE_THRESHOLD), where a quantized box moves
# by a few pixels.
DETECTION_TOLERANCE = {"none": (1e-3, 1e-3), "float16": (1e-2, 1e-2),
                       "dynamic": (0.05, 0.1), "dynamic_mixed": (0.05, 0.1), "int8": (0.05, 0.1),
                       "int8_mixed": (0.05, 0.1)}
MIN_DETECTION_AGREEMENT = {"none": 0.99, "float16": 0.95, "dynamic": 0.9, "dynamic_mixed": 0.9,
                           "int8": 0.9, "int8_mixed": 0.9}
DETECTION_SCORE_THRESHOLD = 0.3
DETECTION_OUTPUTS = ("boxes", "classes", "scores")


class TFLiteExportError(RuntimeError):
    """The converter needed non-builtin ops, or the exported file disagrees with Keras."""


def input_names(model):
    """The model's input names, in its input order: the TFLite file's input names."""
    return [spec.name for spec in input_specs(model)]


def _as_batches(data, batch_size, names=None):
    """Representative data as a list of per-input batches (lists in the model's input order).

    ``data`` is an array (one input), or an iterable of arrays, of lists in input order or of
    dicts keyed by input name (``names``)."""
    if isinstance(data, np.ndarray) or hasattr(data, "numpy"):
        data = np.asarray(data)
        return [[data[i:i + batch_size]] for i in range(0, len(data) - batch_size + 1, batch_size)]
    if isinstance(data, dict):
        data = [data]
    batches = []
    for item in data:
        if isinstance(item, dict):
            item = [item[name] for name in names]
        arrays = item if isinstance(item, (list, tuple)) else [item]
        arrays = [np.asarray(a, np.float32) for a in arrays]
        for i in range(0, len(arrays[0]) - batch_size + 1, batch_size):
            batches.append([a[i:i + batch_size] for a in arrays])
    return batches


def _flex_ops(message):
    ops = set(re.findall(r"\b(Flex\w+)", message))
    ops |= {f"tf.{m}" for m in re.findall(r"\btf\.([A-Z]\w+)", message)}
    return sorted(ops)


def _converter(model, batch_size):
    """A builtin-ops converter of ``model``'s traced call at ``batch_size``."""
    fn = tf.function(lambda *xs: call_on_inputs(model, xs),
                     input_signature=input_specs(model, batch_size))
    # The converter freezes the variables into constants itself (freezing them here as well
    # cost ~30% of a conversion).
    with unfused_norms():  # Keras' LayerNorm and BatchNorm forms: plain TFLite ops
        concrete = fn.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    # Converted directly: lowering to a SavedModel first (TF's default) gives the same ops
    # and numbers and takes 2.5-3x the CPU time (measured on DeiT-Ti).
    converter.experimental_lower_to_saved_model = False
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter


def convert(model, quantization="none", representative_data=None, batch_size=1, int8_io=False,
            verification_data=None, details=None, search=True):
    """The .tflite flatbuffer of ``model`` (bytes). Builtin TFLite ops only.

    int8_mixed and dynamic_mixed search which layer groups stay float (_search_inputs:
    on ``verification_data``, default the representative data, else random images for
    dynamic_mixed; ``search=False``: none, every matmul and convolution int8) and write
    what they chose into the dict ``details``."""
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}, got {quantization!r}")
    if quantization in ("int8", "int8_mixed") and representative_data is None:
        raise ValueError(f"{quantization} quantization needs representative_data (a few "
                         "hundred images like those the model will see) to calibrate "
                         "activation ranges")
    if int8_io and quantization != "int8":
        raise ValueError("int8_io (int8 input and output tensors) needs quantization='int8'")
    converter = _converter(model, batch_size)
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization in ("dynamic", "dynamic_mixed"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantization in ("int8", "int8_mixed"):
        batches = _as_batches(representative_data, batch_size, input_names(model))
        if not batches:
            raise ValueError(f"representative_data holds fewer than batch_size={batch_size} samples")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([np.asarray(a, np.float32) for a in b]
                                                    for b in batches)
        if quantization == "int8":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    with _captured_native_output() as captured:
        try:
            if quantization in ("int8_mixed", "dynamic_mixed"):
                mixed = _int8_mixed if quantization == "int8_mixed" else _dynamic_mixed
                return with_signature(mixed(
                    model, converter, batch_size,
                    _search_inputs(model, quantization, representative_data, verification_data,
                                   batch_size), details if details is not None else {}, search))
            return with_signature(converter.convert())
        except Exception as e:  # ConverterError carries the op list in its text
            ops = _flex_ops(str(e))
            what = f"needs non-builtin ops {', '.join(ops)}" if ops else "failed"
            log = captured()
            raise TFLiteExportError(
                f"TFLite conversion of {model.name!r} ({quantization}) {what}:\n"
                f"{str(e)[-2000:]}" + (f"\nconverter output:\n{log[-2000:]}" if log else "")
            ) from e


# A flatbuffer over 2 GB keeps its weights outside the table the object API re-packs.
_MAX_SIGNED_BYTES = 2 ** 31 - 2 ** 24


def with_signature(flatbuffer, key="serving_default"):
    """The file with a SignatureDef ``key``: the inputs under their tensor names (the Keras
    input names), the outputs as output_0, output_1, ... in the subgraph's (flattened) order.
    Converted straight from the graph (no SavedModel lowering, 2.5-3x cheaper), TF writes no
    signature, and LiteRT's signature runner (`get_signature_runner()`, Android's
    `runSignature`) and ai-edge-quantizer's calibration need one. A file that already has
    one, or is too large to re-pack, comes back unchanged."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    if len(flatbuffer) > _MAX_SIGNED_BYTES:
        return flatbuffer
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    if model.signatureDefs:
        return flatbuffer
    graph = model.subgraphs[0]

    def tensor_map(name, index):
        entry = schema.TensorMapT()
        entry.name, entry.tensorIndex = name, index
        return entry

    signature = schema.SignatureDefT()
    signature.signatureKey, signature.subgraphIndex = key, 0
    signature.inputs = [tensor_map(graph.tensors[i].name.decode().split(":")[0], i)
                        for i in graph.inputs]
    signature.outputs = [tensor_map(f"output_{k}", i) for k, i in enumerate(graph.outputs)]
    model.signatureDefs = [signature]
    return flatbuffer_utils.convert_object_to_bytearray(model)


def _layer_group(tensor_name):
    """The layer kind an op's output belongs to, block indices dropped:
    "vit/blocks.3_1/mlp_1/fc2_1/Tensordot;..." -> "blocks/mlp/fc2"."""
    parts = [p for p in tensor_name.split(";")[0].split("/")[1:-1] if p != "Tensordot"]
    return "/".join(re.sub(r"(\.\d+)+|_\d+$", "", p) for p in parts) or "output"


def _matmul_groups(float_model):
    """{layer group: output tensor names of its MIXED_INT8_OPS ops} of a float flatbuffer,
    and the names of the other ops in it."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=float_model)
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()  # noqa: SLF001  (the public API lists no ops)
    groups = {}
    for op in ops:
        if op["op_name"] in MIXED_INT8_OPS:
            name = names[op["outputs"][0]]
            groups.setdefault(_layer_group(name), []).append(name)
    return groups, sorted({op["op_name"] for op in ops} - set(MIXED_INT8_OPS))


def _search_inputs(model, quantization, representative_data, verification_data, batch_size):
    """The per-input arrays a mixed mode's search scores its candidates on: the verification
    data (default: the representative data). dynamic_mixed calibrates nothing, so it scores
    on the representative images as well: more images, a steadier decision at its 99.5%
    (on the DeiT-S-size model the dynamic file differed on 2 of the 512 held-out images and
    on 7 of all 1,000, each a near-tie)."""
    inputs = _verification_inputs(model, verification_data if verification_data is not None
                                  else representative_data, batch_size)
    if (quantization == "dynamic_mixed" and representative_data is not None
            and verification_data is not None):
        inputs = [np.concatenate(pair) for pair in zip(
            _verification_inputs(model, representative_data, batch_size), inputs)]
    return inputs


def _search_float_groups(model, groups, quantize, target, inputs, batch_size, details,
                         search=True):
    """quantize([]) (a flatbuffer with every group quantized); then, while its top-1 (or
    per-pixel) agreement with Keras on ``inputs`` (per-input arrays) is under ``target``, the
    layer group whose float version raises it most goes back to float (the survey's mixed
    precision by layer sensitivity, Liu et al. 2021, at the granularity of layer kinds).
    ``quantize(kept_float)`` builds the file with those groups float."""
    reference = [np.asarray(r) for r in tf.nest.flatten(call_on_inputs(model, inputs))]
    scored = [i for i, r in enumerate(reference) if search and (_is_logits(r) or (
        r.ndim == 4 and _segmentation_model(model)))]

    def agreement(flatbuffer):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "candidate.tflite")
            with open(path, "wb") as f:
                f.write(flatbuffer)
            outs = _run_file(path, input_names(model), inputs)
        return min(float(np.mean(np.concatenate([o[k] for o in outs]).argmax(-1)
                                 == reference[k].argmax(-1))) for k in scored)

    kept_float, flatbuffer = [], quantize([])
    score = agreement(flatbuffer) if scored else None
    trail = [dict(float_groups=[], agreement=score)]
    while score is not None and score < target and len(kept_float) < len(groups):
        candidates = [(agreement(fb), g, fb) for g in groups if g not in kept_float
                      for fb in [quantize(kept_float + [g])]]
        score, group, flatbuffer = max(candidates, key=lambda c: c[0])
        kept_float.append(group)
        trail.append(dict(float_groups=list(kept_float), agreement=score))
    details.update(int8_ops=list(MIXED_INT8_OPS), float_groups=kept_float,
                   int8_groups=[g for g in groups if g not in kept_float], search=trail)
    return flatbuffer


def _int8_mixed(model, calibrating, batch_size, inputs, details, search=True):
    """Static int8 for MIXED_INT8_OPS, float for the rest, layer groups back in float until
    the agreement reaches MIXED_TARGET_AGREEMENT (_search_float_groups). Calibrated once;
    each candidate is only re-quantized."""
    from tensorflow.lite.python.convert import mlir_quantize

    groups, float_ops = _matmul_groups(_converter(model, batch_size).convert())
    calibrating.experimental_mlir_quantizer = True
    calibrating._experimental_calibrate_only = True  # noqa: SLF001  (TF's own debugger does)
    calibrated = calibrating.convert()

    def quantize(kept_float):
        return mlir_quantize(calibrated, denylisted_ops=float_ops,
                             denylisted_nodes=[n for g in kept_float for n in groups[g]])

    return _search_float_groups(model, groups, quantize, MIXED_TARGET_AGREEMENT, inputs,
                                batch_size, details, search)


def _dynamic_mixed(model, dynamic_converter, batch_size, inputs, details, search=True):
    """Dynamic range, with the layer groups whose int8 weights cost the most agreement back
    in float32 weights until it reaches DYNAMIC_MIXED_TARGET_AGREEMENT. TF's dynamic-range
    converter takes no per-layer denylist, so the float groups' ops get the float file's
    weights back in the dynamic file (matched by the op's output name, which the two
    conversions share): a FULLY_CONNECTED or CONV_2D with float weights is a float op."""
    float_model = _converter(model, batch_size).convert()
    groups, _ = _matmul_groups(float_model)
    dynamic = dynamic_converter.convert()

    def quantize(kept_float):
        return _with_float_weights(dynamic, float_model,
                                   {n for g in kept_float for n in groups[g]})

    return _search_float_groups(model, groups, quantize, DYNAMIC_MIXED_TARGET_AGREEMENT,
                                inputs, batch_size, details, search)


def _with_float_weights(quantized, float_model, op_outputs):
    """The ``quantized`` flatbuffer with the ops whose output tensor is named in
    ``op_outputs`` given back their weights (input 1) from ``float_model``."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    if not op_outputs:
        return quantized
    if len(quantized) > _MAX_SIGNED_BYTES:
        raise TFLiteExportError("dynamic_mixed re-packs the file, which TFLite's object API "
                                "cannot do over 2 GB: use dynamic")
    target = flatbuffer_utils.convert_bytearray_to_object(bytearray(quantized))
    source = flatbuffer_utils.convert_bytearray_to_object(bytearray(float_model))

    def weights_by_output(model):
        graph = model.subgraphs[0]
        return {graph.tensors[op.outputs[0]].name: graph.tensors[op.inputs[1]]
                for op in graph.operators if len(op.inputs) > 1 and op.inputs[1] >= 0}

    float_weights = weights_by_output(source)
    users = collections.Counter(tensor.buffer for tensor in target.subgraphs[0].tensors)
    for name, tensor in weights_by_output(target).items():
        if name.decode() not in op_outputs or tensor.type == schema.TensorType.FLOAT32:
            continue
        original = float_weights[name]
        if users[tensor.buffer] == 1:  # the int8 copy is left empty rather than re-indexed
            target.buffers[tensor.buffer].data = None
        buffer = schema.BufferT()
        buffer.data = source.buffers[original.buffer].data
        target.buffers.append(buffer)
        tensor.buffer, tensor.type = len(target.buffers) - 1, schema.TensorType.FLOAT32
        tensor.quantization, tensor.shape = None, original.shape
    return bytes(flatbuffer_utils.convert_object_to_bytearray(target))


@contextlib.contextmanager
def _captured_native_output():
    """Captures what the converter's C++ code prints on stdout/stderr (the calibrator's raw
    "fully_quantize: 0, inference_type: 6, ..." line, MLIR pass notes) while it runs; the
    text is kept for the error of a failed conversion and logged at absl verbosity 1.
    Yields a function that returns the text captured so far."""
    import sys
    import tempfile

    from absl import logging

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as sink:
        for fd in saved:
            os.dup2(sink.fileno(), fd)

        def captured():
            sys.stdout.flush()
            sys.stderr.flush()
            sink.seek(0)
            return sink.read().decode(errors="replace")

        try:
            yield captured
        finally:
            text = captured()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            if text.strip():
                logging.vlog(1, "TFLite converter output:\n%s", text)


class LiteRTRunner:
    """Runs a .tflite file with ai_edge_litert, handling int8 input/output (de)quantisation.

    Inputs are matched by name (the Keras input names, which the file's signature keeps); a
    single-input file also takes its input by position. Outputs come back in the order of
    the Keras model's flattened outputs (``tf.nest.flatten``: a list in order, a dict by
    sorted key), one array for a single output, else a list."""

    def __init__(self, path, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        with _captured_native_output():  # LiteRT's "Created ... XNNPACK delegate" line
            self.interpreter = Interpreter(model_path=os.fspath(path), num_threads=num_threads)
            self.interpreter.allocate_tensors()
        if self.interpreter.get_signature_list():
            # The signature maps names to tensors; the tensors themselves are set and read
            # directly (the signature runner re-allocates on every call: slow for benchmarks).
            signature = self.interpreter.get_signature_runner()
            self.named_inputs = signature.get_input_details()
            outputs = signature.get_output_details()
            # Converted outputs are named output_0, output_1, ... in flattened order.
            self.outputs = [outputs[k] for k in sorted(outputs, key=_output_position)]
        else:
            self.named_inputs = {d["name"]: d for d in self.interpreter.get_input_details()}
            self.outputs = self.interpreter.get_output_details()
        self.inputs = list(self.named_inputs.values())

    def __call__(self, *arrays, **named):
        if arrays and len(arrays) == 1 and not named and len(self.inputs) == 1:
            named = {next(iter(self.named_inputs)): arrays[0]}
        elif arrays:
            raise ValueError(f"a file with {len(self.inputs)} inputs takes them by name: "
                             f"{sorted(self.named_inputs)}")
        if set(named) != set(self.named_inputs):
            raise ValueError(f"the file's inputs are {sorted(self.named_inputs)}, got "
                             f"{sorted(named)}")
        for name, array in named.items():
            detail = self.named_inputs[name]
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


def _output_position(name):
    suffix = name.rsplit("_", 1)[-1]
    return (0, int(suffix), "") if suffix.isdigit() else (1, 0, name)


def _output_names(outputs):
    """Names of the flattened outputs: the dict keys (sorted, as flattened), else indices."""
    if isinstance(outputs, dict):
        return [str(k) for k in sorted(outputs)]
    if isinstance(outputs, (list, tuple)):
        return [f"output_{i}" for i in range(len(outputs))]
    return ["output"]


def _is_logits(array):
    """(N, C) with C > 1: class scores, where top-1 agreement means something."""
    return array.ndim == 2 and array.shape[-1] > 1


def _segmentation_model(model):
    """A segmentation model's 4-D outputs are per-pixel logits."""
    from keras_vit.registry import model_task

    return model_task(model) == "segmentation"


def detection_agreement(reference, lite, image_size, quantization="none"):
    """The share of the Keras detections that the TFLite file reproduces (None if none is
    checked), for {"scores" (N, k), "classes" (N, k), "boxes" (N, k, 4) xyxy pixels}.

    A Keras detection counts as found when a TFLite detection of the same class has its box
    within DETECTION_TOLERANCE[quantization][0] x the image size and its score within [1]:
    matched by content, not rank, so that near-tied scores may swap places. Float modes check
    the detections whose score is clear of the k-th one (a tie at the cut may drop one);
    quantized modes the confident ones (score >= DETECTION_SCORE_THRESHOLD)."""
    box_tol, score_tol = DETECTION_TOLERANCE[quantization]
    box_tol *= float(max(image_size))
    checked = found = 0
    for i in range(len(reference["scores"])):
        scores, classes, boxes = (np.asarray(reference[k][i]) for k in
                                  ("scores", "classes", "boxes"))
        l_scores, l_classes, l_boxes = (np.asarray(lite[k][i]) for k in
                                        ("scores", "classes", "boxes"))
        if quantization in FLOAT_TOLERANCE:
            keep = scores > scores.min() + 1e-5  # clear of float round-off at the cut
        else:
            keep = scores >= DETECTION_SCORE_THRESHOLD
        for j in np.flatnonzero(keep):
            match = ((l_classes == classes[j]) & (np.abs(l_scores - scores[j]) <= score_tol)
                     & np.all(np.abs(l_boxes - boxes[j]) <= box_tol, axis=-1))
            checked += 1
            found += bool(match.any())
    return found / checked if checked else None


def _run_file(path, names, arrays):
    """The file's outputs on ``arrays`` (per input, in ``names`` order), batch by batch at
    the file's batch size: a list per batch of its outputs (flattened order)."""
    runner = LiteRTRunner(path)
    n, batch = len(arrays[0]), int(runner.inputs[0]["shape"][0])
    if n % batch:
        raise ValueError(f"{n} verification samples do not split into batches of {batch}")
    lite_batches = []
    for i in range(0, n, batch):
        out = runner(**{name: a[i:i + batch] for name, a in zip(names, arrays)})
        lite_batches.append(out if isinstance(out, list) else [out])
    return lite_batches


def verify_tflite(path, model, inputs, quantization="none"):
    """Runs the .tflite file on ``inputs`` (N samples; the file's batch size divides N) and
    compares each of its outputs with the Keras model's.

    ``inputs``: an array (single-input models), a list in the model's input order or a dict
    by input name. Returns size_bytes and, per output (``outputs``, by dict key or
    ``output_i``), max_abs_diff, relative_diff (to that Keras output's max magnitude) and,
    for logits-like (N, C) outputs, top1_agreement; the top-level max_abs_diff and
    relative_diff are the worst over outputs, top1_agreement the lowest (None when no output
    is logits-like); segmentation models' per-pixel logits get pixel_agreement (of the
    argmax over classes), the top-level one the lowest; post-processed detectors (outputs
    scores, classes, boxes) get detection_agreement (see detection_agreement, with the
    tolerances of ``quantization``)."""
    names = input_names(model)
    if isinstance(inputs, dict):
        arrays = [np.asarray(inputs[name], np.float32) for name in names]
    elif isinstance(inputs, (list, tuple)):
        arrays = [np.asarray(a, np.float32) for a in inputs]
    else:
        arrays = [np.asarray(inputs, np.float32)]
    if len(arrays) != len(names):
        raise ValueError(f"the model takes {len(names)} inputs {names}, got {len(arrays)}")
    lite_batches = _run_file(path, names, arrays)
    reference = call_on_inputs(model, arrays)
    refs = [np.asarray(r) for r in tf.nest.flatten(reference)]
    if len(refs) != len(lite_batches[0]):
        raise TFLiteExportError(f"the TFLite file has {len(lite_batches[0])} outputs, the "
                                f"Keras model {len(refs)}")
    per_output, segmentation = {}, _segmentation_model(model)
    names = _output_names(reference)
    detections = sorted(names) == list(DETECTION_OUTPUTS)
    for k, (name, ref) in enumerate(zip(names, refs)):
        lite = np.concatenate([b[k] for b in lite_batches])
        if lite.shape != ref.shape:
            raise TFLiteExportError(f"output {name!r}: TFLite shape {lite.shape}, Keras "
                                    f"{ref.shape}")
        diff = float(np.max(np.abs(lite - ref)))
        scale = float(max(np.max(np.abs(ref)), 1e-12))
        row = dict(shape=list(ref.shape), max_abs_diff=diff, relative_diff=diff / scale)
        if _is_logits(ref) and not detections:  # (N, k) scores of ranked detections
            row["top1_agreement"] = float(np.mean(lite.argmax(-1) == ref.argmax(-1)))
        elif ref.ndim == 4 and segmentation:
            row["pixel_agreement"] = float(np.mean(lite.argmax(-1) == ref.argmax(-1)))
        per_output[name] = row
    top1 = [r["top1_agreement"] for r in per_output.values() if "top1_agreement" in r]
    pixel = [r["pixel_agreement"] for r in per_output.values() if "pixel_agreement" in r]
    report = dict(max_abs_diff=max(r["max_abs_diff"] for r in per_output.values()),
                  relative_diff=max(r["relative_diff"] for r in per_output.values()),
                  top1_agreement=min(top1) if top1 else None,
                  pixel_agreement=min(pixel) if pixel else None, outputs=per_output,
                  size_bytes=os.path.getsize(path))
    if detections:
        lite = {name: np.concatenate([b[k] for b in lite_batches])
                for k, name in enumerate(names)}
        report["detection_agreement"] = detection_agreement(
            dict(zip(names, refs)), lite, arrays[0].shape[1:3], quantization)
    return report


def _verification_inputs(model, representative_data, batch_size, n=8, seed=0):
    """Per-input arrays (model input order): the representative data, else random normal."""
    if representative_data is not None:
        batches = _as_batches(representative_data, batch_size, input_names(model))
        arrays = [np.concatenate(per_input) for per_input in zip(*batches)]
        keep = max(batch_size, len(arrays[0]) // batch_size * batch_size)
        return [a[:keep] for a in arrays]
    n = max(batch_size, n // batch_size * batch_size)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n,) + tuple(t.shape[1:])).astype(np.float32)
            for t in model.inputs]


def check_report(report, quantization):
    """Raises TFLiteExportError unless the verification ``report`` meets the tolerance of
    ``quantization``: float modes bound every output's relative difference; integer modes
    bound the top-1 agreement of every logits-like output and, for the other outputs
    (feature maps, boxes), their relative difference."""
    failures = []
    if "detection_agreement" in report:  # judged by what it detects, not output by output
        agreement = report["detection_agreement"]
        if agreement is None:
            failures.append("no Keras detection to compare with (every score tied, or none "
                            f">= {DETECTION_SCORE_THRESHOLD} for a quantized file): verify "
                            "on images of the objects the detector was trained on")
        elif agreement < MIN_DETECTION_AGREEMENT[quantization]:
            failures.append(f"the file reproduces {100 * agreement:.1f}% of Keras' "
                            f"detections (< {100 * MIN_DETECTION_AGREEMENT[quantization]:.0f}%)")
    per_output = {} if "detection_agreement" in report else report["outputs"]
    for name, row in per_output.items():
        if "pixel_agreement" in row and row["pixel_agreement"] < MIN_PIXEL_AGREEMENT[
                quantization]:
            failures.append(f"output {name!r} per-pixel argmax agreement with Keras is "
                            f"{row['pixel_agreement']:.3f} (< "
                            f"{MIN_PIXEL_AGREEMENT[quantization]})")
        if quantization not in FLOAT_TOLERANCE and "pixel_agreement" in row:
            continue  # quantized segmentation logits: judged by their argmax alone
        if quantization in FLOAT_TOLERANCE or "top1_agreement" not in row:
            tolerance = {**FLOAT_TOLERANCE, **MAX_QUANTIZED_RELATIVE_DIFF}[quantization]
            if not row["relative_diff"] <= tolerance:
                failures.append(f"output {name!r} differs from Keras by "
                                f"{row['relative_diff']:.2e} of its scale (tolerance "
                                f"{tolerance:.0e})")
        elif row["top1_agreement"] < MIN_TOP1_AGREEMENT[quantization]:
            failures.append(f"output {name!r} top-1 agreement with Keras is "
                            f"{row['top1_agreement']:.2f} (< {MIN_TOP1_AGREEMENT[quantization]})")
    if failures:
        raise TFLiteExportError(f"{quantization} TFLite export: " + "; ".join(failures) +
                                "; file not written")


def export_tflite(model, path, quantization="none", representative_data=None, batch_size=1,
                  verify=True, int8_io=False, verification_data=None):
    """Converts ``model`` to a builtin-only .tflite file at ``path`` and verifies it.

    quantization: "none" (fp32), "float16", "dynamic" (int8 weights), "dynamic_mixed"
    (dynamic range, layer groups back in float weights until agreement >=
    DYNAMIC_MIXED_TARGET_AGREEMENT: see _dynamic_mixed), "int8" (full integer; needs
    ``representative_data``: an array, or per-input lists or dicts by input name) or
    "int8_mixed" (int8 matmuls and convolutions, the rest float; layer groups back in float
    until agreement >= MIXED_TARGET_AGREEMENT: see _int8_mixed); the report's
    "mixed_precision" says which groups the mixed modes kept float. ``verification_data``
    (same forms; default: the representative data) is what the file is verified on: give
    images the calibration did not see. ``verify=False`` also skips the mixed modes'
    search. The file is written atomically and only once every
    output passes verification (check_report: fp32: max abs diff <= 1e-4 of that
    output's scale; fp16: 1e-2; dynamic/int8: top-1 agreement >= 0.9 for class
    scores, relative diff <= 0.1 / 0.3 for feature maps and boxes, on the
    representative data; segmentation logits by their per-pixel argmax, post-processed
    detectors by the detections they reproduce: see MIN_PIXEL_AGREEMENT and
    detection_agreement), so an existing file is never replaced by a bad one.
    Multi-output models (features_only pyramids, dicts of heads) are verified
    output by output; multi-input models are fed by input name. Returns the
    verification report (dict, see verify_tflite).
    """
    details = {}
    flatbuffer = convert(model, quantization, representative_data, batch_size, int8_io,
                         verification_data, details, search=verify)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(flatbuffer)
        report = dict(quantization=quantization, size_bytes=len(flatbuffer), path=os.fspath(path))
        if details:
            report["mixed_precision"] = details
        if verify:
            inputs = _verification_inputs(
                model, representative_data if verification_data is None else verification_data,
                batch_size)
            report.update(verify_tflite(tmp, model, inputs, quantization))
            check_report(report, quantization)
    return report
