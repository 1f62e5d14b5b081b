"""Reduced precision (keras_vit.precision): a model copied under mixed_bfloat16 keeps its
float32 weights exactly, computes its matmuls in bfloat16 and its softmax and LayerNorm in
float32, is rebuilt identically from the float32 .keras file, and stays within bfloat16's
rounding of float32."""

import keras
import numpy as np
import pytest

import keras_vit
from conftest import images
from families import SMALLEST, build_smallest
from keras_vit.layers.attention import softmax_float32
from keras_vit.precision import (dtype_policy_scope, policy_name, reduced_precision_note,
                                 with_dtype_policy)

SMALL = {"vit_tiny_patch16_224": dict(img_size=32, patch_size=8, depth=2, num_classes=8),
         "swin_tiny_patch4_window7_224": dict(img_size=56, depths=(2, 2), num_heads=(2, 4),
                                              embed_dim=32, num_classes=8)}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bfloat16_copy_keeps_weights_and_follows_float32(name, tmp_path):
    model = keras_vit.create_model(name, **SMALL[name])
    x = images(4, SMALL[name]["img_size"])
    reduced = with_dtype_policy(model, "bfloat16")
    for a, b in zip(model.weights, reduced.weights):
        assert a.dtype == b.dtype == "float32"
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    dense = [layer for layer in reduced._flatten_layers() if isinstance(layer, keras.layers.Dense)]
    assert dense and all(layer.compute_dtype == "bfloat16" for layer in dense)
    reference = np.asarray(model(x))
    out = reduced(x)
    assert out.dtype == "bfloat16"
    out = np.asarray(keras.ops.cast(out, "float32"))
    # bfloat16 keeps 8 bits of mantissa: relative rounding 2^-9 per op, a few percent after
    # a few blocks; random weights give small logits, so measured against their spread
    assert np.max(np.abs(out - reference)) <= 0.05 * np.ptp(reference)
    # The float32 model is the file to keep: loaded and copied again, the same bfloat16 model
    path = str(tmp_path / "m.keras")
    model.save(path)
    again = with_dtype_policy(keras.saving.load_model(path), "bfloat16")
    np.testing.assert_array_equal(np.asarray(keras.ops.cast(again(x), "float32")), out)


def test_create_model_builds_every_layer_under_the_policy():
    model = keras_vit.create_model("vit_tiny_patch16_224", dtype_policy="mixed_bfloat16",
                                   **SMALL["vit_tiny_patch16_224"])
    inner = [layer for layer in model._flatten_layers() if layer is not model
             and not isinstance(layer, keras.layers.InputLayer)]
    assert inner and {layer.dtype_policy.name for layer in inner} == {"mixed_bfloat16"}
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    with pytest.raises(ValueError, match="precision must be one of"):
        keras_vit.create_model("vit_tiny_patch16_224", dtype_policy="int4")


def test_softmax_float32_rounds_once():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 197, 197)).astype(np.float32) * 4
    in_float32 = softmax_float32(keras.ops.cast(logits, "bfloat16"))
    assert in_float32.dtype == "bfloat16"
    bf16_logits = np.asarray(keras.ops.cast(keras.ops.cast(logits, "bfloat16"), "float32"))
    expect = np.exp(bf16_logits - bf16_logits.max(-1, keepdims=True))
    expect /= expect.sum(-1, keepdims=True)
    got = np.asarray(keras.ops.cast(in_float32, "float32"))
    # only the final rounding to bfloat16: within 2^-8 of each probability
    np.testing.assert_allclose(got, expect, rtol=2 ** -8, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(softmax_float32(logits)),
                                  np.asarray(keras.ops.softmax(logits, axis=-1)))
    # float64 (the float64 parity fixtures) stays float64: no rounding through float32
    wide = keras.ops.convert_to_tensor(logits.astype(np.float64))
    assert softmax_float32(wide).dtype == "float64"
    np.testing.assert_array_equal(np.asarray(softmax_float32(wide)),
                                  np.asarray(keras.ops.softmax(wide, axis=-1)))


def test_bfloat16_softmax_skips_the_casts_where_onednn_rounds_once():
    """With TensorFlow's oneDNN kernels on a CPU (as the apps and this suite run), bfloat16
    softmax computes in float32 and rounds once, so softmax_float32 calls it directly:
    bit-identical to the float32 softmax cast to bfloat16, without the two casts of the
    logits. Under a gradient tape it keeps the casts (TensorFlow's softmax gradient would
    otherwise run in bfloat16)."""
    import tensorflow as tf

    from keras_vit.layers.common import onednn_cpu

    assert onednn_cpu()
    rng = np.random.default_rng(1)
    logits = tf.cast(rng.standard_normal((2, 3, 197, 197)).astype(np.float32) * 4, tf.bfloat16)
    direct = tf.function(softmax_float32)
    via_float32 = tf.cast(tf.nn.softmax(tf.cast(logits, tf.float32)), tf.bfloat16)
    np.testing.assert_array_equal(np.asarray(tf.cast(direct(logits), tf.float32)),
                                  np.asarray(tf.cast(via_float32, tf.float32)))
    graph = direct.get_concrete_function(tf.TensorSpec(logits.shape, tf.bfloat16)).graph
    assert not [op for op in graph.get_operations() if op.type == "Cast"]

    @tf.function
    def taped(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(softmax_float32(x), tf.float32) ** 2)
        return tape.gradient(loss, x)

    graph = taped.get_concrete_function(tf.TensorSpec(logits.shape, tf.bfloat16)).graph
    assert [op for op in graph.get_operations() if op.type == "Cast"]


def test_policy_names_and_scope():
    assert policy_name("bfloat16") == "mixed_bfloat16"
    assert policy_name("mixed_bfloat16") == "mixed_bfloat16"
    with dtype_policy_scope("bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"


def test_bfloat16_on_a_cpu_without_a_bfloat16_unit_says_it_is_emulated(monkeypatch):
    """--precision=bfloat16 (evaluate), --mixed_precision=mixed_bfloat16 (train) and the
    benchmark's *_bf16 modes say when the CPU would emulate bfloat16 (0.90-0.99x float32 on
    the AVX2 CPU of benchmarks/README.md), and stay quiet where it has AVX-512 BF16 or AMX,
    where a GPU or TPU computes, or where the flags cannot be read."""
    avx2 = ["avx2", "fma"]
    for precision in ("bfloat16", "mixed_bfloat16"):
        note = reduced_precision_note(precision, cpu_flags=avx2, accelerators=[])
        assert "emulated" in note and "avx512_bf16" in note and "float32" in note
    assert reduced_precision_note("bfloat16", avx2 + ["avx512_bf16"], []) is None
    assert reduced_precision_note("bfloat16", avx2 + ["amx_bf16"], []) is None
    assert reduced_precision_note("bfloat16", avx2, ["GPU:0"]) is None
    assert reduced_precision_note("bfloat16", None, []) is None  # unreadable flags
    assert reduced_precision_note("float32", avx2, []) is None
    assert reduced_precision_note("float16", avx2, []) is None
    with pytest.raises(ValueError, match="precision must be one of"):
        reduced_precision_note("int4", avx2, [])

    # the benchmark's bf16 row carries it, read from this machine's (patched) flags
    from keras_vit import benchmark as bm
    from keras_vit import measure

    monkeypatch.setattr(measure, "cpu_flags", lambda: avx2)
    model = keras_vit.create_model("vit_tiny_patch16_224", **SMALL["vit_tiny_patch16_224"])
    bench = bm.KerasBench(model, 32, batch_size=1, threads=1, warmup=0, iters=1)
    bench.run("tf_function_bf16")
    assert "emulated" in bench.notes["tf_function_bf16"]
    bench.run("tf_function")
    assert "tf_function" not in bench.notes


def _softmax_dtypes(model, img_size):
    """The dtypes of every Softmax op in the model's traced inference graph."""
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec((1, img_size, img_size, 3))).graph
    graphs = [graph] + [f.graph for f in getattr(graph, "_functions", {}).values()
                        if hasattr(f, "graph")]
    return [op.get_attr("T").name for g in graphs for op in g.get_operations()
            if op.type == "Softmax"]


_ATTENTION_CASES = [(case, None) for case in sorted(SMALLEST) if case != "resnet"] + [
    ("vit", kind) for kind in ("bigbird", "topk", "lsra", "hamburger")]


@pytest.mark.parametrize("case,attention", _ATTENTION_CASES,
                         ids=[c + (f"-{a}" if a else "") for c, a in _ATTENTION_CASES])
def test_every_attention_softmax_runs_in_float32_under_mixed_bfloat16(case, attention,
                                                                     monkeypatch):
    # Under mixed_bfloat16 a bfloat16 softmax sums a row of exponentials with an 8-bit
    # mantissa (errors of a few percent over 197 keys); every family's attention, the
    # detectors' and segmenters' and each efficient token mixer must take softmax_float32.
    # (As where oneDNN is off: with it, softmax_float32 takes the bfloat16 softmax, which
    # oneDNN computes in float32, see the test above.)
    monkeypatch.setattr("keras_vit.layers.attention.onednn_cpu", lambda: False)
    extra = {"attention": attention} if attention else {}
    model = build_smallest(case, dtype_policy="mixed_bfloat16", **extra)
    dtypes = _softmax_dtypes(model, SMALLEST[case][1]["img_size"])
    assert dtypes, f"{case}: no Softmax in the graph (attention not found)"
    assert set(dtypes) == {"float32"}, f"{case}: Softmax dtypes {dtypes}"
