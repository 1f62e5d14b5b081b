"""Compression (keras_vit/compress/): LayerDrop and the shallower model it allows, SVD
factorisation and head pruning, each checked against a dense model given the weights the
technique implies, then as an ordinary model (.keras, TFLite, a training step).

Tolerances: the compressed and the direct models compute the same function in float32 with
their matmuls split differently ((x A) B against x (A B); fewer heads summed), so logits of
size ~0.1 agree to float32 rounding (atol 1e-5); the gate gradient against its central
finite difference (eps 0.05) carries the difference's O(eps^2) error and float32 loss
rounding (rtol 5%)."""


import keras
import numpy as np
import pytest

import keras_vit
from keras_vit.compress import (count_heads, energy_for_fraction, energy_rank,
                                every_other_block, factorize_dense, head_gate_gradients,
                                head_importance, keep_blocks, least_important_heads_removed,
                                prune_heads, prune_heads_iteratively, with_attention)
from helpers import check_keras_round_trip, check_tflite_fp32, check_train_step_lowers_loss

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)


def assert_equal_and_ordinary(compressed, direct, tmp_path):
    """``compressed`` gives ``direct``'s outputs and is an ordinary model: a bit-for-bit
    .keras round trip, a builtin-only TFLite file that matches, a training step (fine-tuning)
    that lowers the loss."""
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    y = keras.ops.convert_to_numpy(compressed(x))
    np.testing.assert_allclose(y, keras.ops.convert_to_numpy(direct(x)), atol=1e-5)
    check_keras_round_trip(compressed, x, tmp_path)
    check_tflite_fp32(compressed, tmp_path)
    check_train_step_lowers_loss(compressed, x, np.array([0, 1]))


def test_every_other_block():
    assert every_other_block(12, 6) == [0, 2, 4, 6, 8, 10]
    assert every_other_block(4, 4) == [0, 1, 2, 3] and every_other_block(5, 1) == [0]
    with pytest.raises(ValueError, match="keep must be in 1..4"):
        every_other_block(4, 0)


def test_layer_drop_skips_whole_blocks_in_training_only():
    model = keras_vit.create_model("deit_tiny_patch16_224", layer_drop=1.0, **SMALL)
    plain = keras_vit.create_model("deit_tiny_patch16_224", **SMALL)
    plain.set_weights(model.get_weights())  # LayerDrop has no weights: the same model
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    # the same weights and graph but for LayerDrop's pass-through: equal to rounding
    np.testing.assert_allclose(model(x, training=False), plain(x, training=False), atol=1e-6)
    # rate 1: in training every block passes its input on, as a graph without them does
    without = keras.models.clone_model(
        plain, clone_function=lambda layer: layer,
        call_function=lambda layer, *a, **k: a[0] if layer.name.startswith("blocks.")
        else layer(*a, **k))
    skipped = keras.ops.convert_to_numpy(model(x, training=True))
    np.testing.assert_allclose(skipped, without(x, training=False), atol=1e-6)
    assert not np.allclose(skipped, plain(x, training=False), atol=1e-4)


def test_kept_blocks_equal_a_shallower_model_with_their_weights(tmp_path):
    model = keras_vit.create_model("deit_small_patch16_224", layer_drop=0.2, **SMALL)
    keep = every_other_block(4, 2)  # blocks 0 and 2
    pruned = keep_blocks(model, keep)
    assert len(pruned.weights) < len(model.weights)
    assert keras_vit.models.common.count_parameters(pruned) < \
        keras_vit.models.common.count_parameters(model)
    # the direct reading: a depth-2 model, block i given block keep[i]'s weights
    direct = keras_vit.create_model("deit_small_patch16_224", **dict(SMALL, depth=2))
    source = {layer.name: layer for layer in model.layers}
    for layer in direct.layers:
        twin = (source[f"blocks.{keep[int(layer.name.split('.')[1])]}"]
                if layer.name.startswith("blocks.") else source.get(layer.name))
        if twin is not None and layer.weights:
            layer.set_weights(twin.get_weights())
    assert_equal_and_ordinary(pruned, direct, tmp_path)
    with pytest.raises(ValueError, match="subset of the blocks 0..3"):
        keep_blocks(model, [0, 7])


def test_energy_rank_and_truncated_factors():
    from keras_vit.compress.low_rank import truncated_factors

    assert energy_rank(np.array([3.0, 2.0, 1.0]), 0.9) == 2  # 9 + 4 = 13 of 14 >= 0.9
    assert energy_rank(np.array([3.0, 2.0, 1.0]), 1.0) == 3
    w = np.random.default_rng(0).standard_normal((6, 4))
    a, b = truncated_factors(w, 4)
    np.testing.assert_allclose(a @ b, w, atol=1e-10)  # full rank: exact to float64 rounding


def test_factorised_model_is_the_truncated_svd_of_each_kernel(tmp_path):
    model = keras_vit.create_model("deit_small_patch16_224", **SMALL)
    small, ranks = factorize_dense(model, energy=0.9)
    assert set(ranks) == {f"blocks.{i}" for i in range(4)}
    assert keras_vit.models.common.count_parameters(small) < \
        keras_vit.models.common.count_parameters(model)
    # the direct reading: the dense model with every factorised kernel replaced by its
    # best rank-r approximation, r the fewest singular values keeping 90% of the energy
    direct = keras_vit.create_model("deit_small_patch16_224", **SMALL)
    direct.set_weights(model.get_weights())
    for name, layer_ranks in ranks.items():
        block = direct.get_layer(name)
        for key, rank in layer_ranks.items():
            dense = {"qkv": block.attn.qkv, "proj": block.attn.proj, "fc1": block.mlp.fc1,
                     "fc2": block.mlp.fc2}[key]
            w = keras.ops.convert_to_numpy(dense.kernel)
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            assert rank == int(np.argmax(np.cumsum(s ** 2) / np.sum(s ** 2) >= 0.9 - 1e-12)) + 1
            dense.kernel.assign((u[:, :rank] * s[:rank]) @ vt[:rank])
    assert_equal_and_ordinary(small, direct, tmp_path)
    assert factorize_dense(model, energy=1.0)[1] == {}  # full rank saves nothing: untouched


def _proj_rows(block, head):
    d = block.attn.head_dim
    return slice(head * d, (head + 1) * d)


def test_head_gate_gradient_is_the_loss_slope_of_scaling_that_head():
    model = keras_vit.create_model("deit_small_patch16_224", **SMALL)
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
    y = np.array([0, 1, 2, 3])
    grads = head_gate_gradients(model, x, y)
    assert set(grads) == {f"blocks.{i}" for i in range(4)} and grads["blocks.0"].shape == (2,)

    def loss_with_gate(block, head, gate):  # the head's output scaled by ``gate``
        kernel = block.attn.proj.kernel
        saved = keras.ops.convert_to_numpy(kernel)
        scaled = saved.copy()
        scaled[_proj_rows(block, head)] *= gate
        kernel.assign(scaled)
        logits = model(x)
        kernel.assign(saved)
        return float(np.mean(keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True)))

    for name, head in (("blocks.0", 1), ("blocks.3", 0)):
        block, eps = model.get_layer(name), 0.05
        slope = (loss_with_gate(block, head, 1 + eps) - loss_with_gate(block, head, 1 - eps)) / (
            2 * eps)
        assert abs(slope) > 1e-4  # a real slope, not two zeros agreeing
        np.testing.assert_allclose(grads[name][head], slope, rtol=0.05)
    importance = head_importance(model, [(x, y), (x[::-1], y[::-1])])
    for v in importance.values():
        np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-5)  # unit, to rounding


def test_pruned_heads_equal_the_model_with_their_outputs_zeroed(tmp_path):
    model = keras_vit.create_model("deit_small_patch16_224", **dict(SMALL, num_heads=4))
    importance = {"blocks.0": np.array([0.9, 0.1, 0.5, 0.2]), "blocks.1": np.array([1, 1, 1, 1]),
                  "blocks.2": np.array([0.3, 0.4, 0.6, 0.7]), "blocks.3": np.array([1, 1, 1, 1])}
    keep = least_important_heads_removed(importance, fraction=0.25)  # 4 of 16 heads
    assert keep["blocks.0"] == [0, 2] and keep["blocks.2"] == [2, 3]
    assert keep["blocks.1"] == keep["blocks.3"] == [0, 1, 2, 3]
    pruned = prune_heads(model, keep)
    assert pruned.get_layer("blocks.0").get_config()["num_heads"] == 2
    assert keras_vit.models.common.count_parameters(pruned) < \
        keras_vit.models.common.count_parameters(model)
    # the direct reading: the unpruned model whose removed heads' outputs are zeroed
    direct = keras_vit.create_model("deit_small_patch16_224", **dict(SMALL, num_heads=4))
    direct.set_weights(model.get_weights())
    for name, kept in keep.items():
        block = direct.get_layer(name)
        kernel = keras.ops.convert_to_numpy(block.attn.proj.kernel).copy()
        for head in set(range(4)) - set(kept):
            kernel[_proj_rows(block, head)] = 0
        block.attn.proj.kernel.assign(kernel)
    assert_equal_and_ordinary(pruned, direct, tmp_path)
    with pytest.raises(ValueError, match="non-empty subset of its heads 0..3"):
        prune_heads(model, {"blocks.0": []})


def _block_linear_weights(model):
    return sum(int(np.prod(w.shape)) for w in model.weights
               if w.path.startswith("blocks.") and "kernel" in w.path)


def test_parameter_budget_picks_the_largest_energy_within_it():
    model = keras_vit.create_model("deit_small_patch16_224", **SMALL)
    dense = _block_linear_weights(model)
    energy = energy_for_fraction(model, 0.5)
    small, _ = factorize_dense(model, param_fraction=0.5)
    assert _block_linear_weights(small) <= 0.5 * dense  # within the budget
    # and a little more energy breaks it: the budget is used, not undershot
    more, _ = factorize_dense(model, energy=min(energy + 2e-4, 1.0))
    assert _block_linear_weights(more) > 0.5 * dense
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        energy_for_fraction(model, 1.5)


def test_iterative_pruning_removes_the_fraction_over_its_rounds():
    model = keras_vit.create_model("deit_small_patch16_224", **dict(SMALL, num_heads=4))
    rng = np.random.default_rng(4)
    batches = [(rng.uniform(-1, 1, (4, 32, 32, 3)).astype("float32"), np.array([0, 1, 2, 3]))]
    # one round is the one-shot pruning of the measured importance
    once = prune_heads_iteratively(model, batches, 0.5, steps=1)
    direct = prune_heads(model, least_important_heads_removed(head_importance(model, batches),
                                                              0.5))
    x = batches[0][0]
    np.testing.assert_allclose(once(x), direct(x), atol=1e-6)  # the same graph and weights
    tuned = []
    pruned = prune_heads_iteratively(model, batches, 0.5, steps=3,
                                     fine_tune=lambda m: tuned.append(m) or m)
    assert sum(count_heads(pruned).values()) == 8 and len(tuned) == 3  # 16 heads -> 8
    assert all(n >= 1 for n in count_heads(pruned).values())
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        prune_heads_iteratively(model, batches, 1.0)


def test_swapped_attention_is_the_model_built_with_it_and_the_same_weights(tmp_path):
    model = keras_vit.create_model("deit_small_patch16_224", **SMALL)
    linear = with_attention(model, "linear")
    direct = keras_vit.create_model("deit_small_patch16_224", attention="linear", **SMALL)
    direct.set_weights(model.get_weights())  # linear attention keeps the dense weights
    assert_equal_and_ordinary(linear, direct, tmp_path)
    with pytest.raises(ValueError, match="does not keep the dense layer's weights"):
        with_attention(model, "lsra")
