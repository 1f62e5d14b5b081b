"""Head pruning (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): each
head's importance is |dL/dxi_h| averaged over data, xi_h a gate on the head's output, and
the least important heads are removed from the weights, so the pruned model is smaller and
faster, with its per-block head counts in its config.

Gating head h's output by xi_h is scaling the rows of the output projection that read it,
so dL/dxi_h at xi = 1 is sum(W_proj[rows of h] * dL/dW_proj[rows of h]): the importance
comes from the projection's weight gradient, without gates in the model."""

import keras
import numpy as np

from keras_vit.compress.layers import block_layers
from keras_vit.layers.attention import MultiHeadAttention
from keras_vit.layers.blocks import TransformerBlock


def _attention_blocks(model, prefix):
    return {name: block for name, block in
            ((b.name, b) for _, b in sorted(block_layers(model, prefix).items()))
            if isinstance(block, TransformerBlock) and type(block.attn) is MultiHeadAttention}


def head_gate_gradients(model, images, labels, prefix="blocks."):
    """{block name: (heads,) dL/dxi_h} of the mean cross-entropy of ``model`` (logits) on
    one batch: the signed gate gradients (``head_importance`` averages their size)."""
    import tensorflow as tf

    blocks = _attention_blocks(model, prefix)
    kernels = [block.attn.proj.kernel for block in blocks.values()]
    with tf.GradientTape() as tape:
        logits = model(images, training=False)
        loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        loss = tf.reduce_mean(loss)
    grads = tape.gradient(loss, kernels)
    out = {}
    for (name, block), kernel, grad in zip(blocks.items(), kernels, grads):
        per_row = np.sum(keras.ops.convert_to_numpy(kernel) * np.asarray(grad), axis=1)
        out[name] = per_row.reshape(block.attn.num_heads, block.attn.head_dim).sum(axis=1)
    return out


def head_importance(model, batches, prefix="blocks."):
    """{block name: (heads,) importance}: |dL/dxi_h| averaged over ``batches`` of (images,
    labels), each block's normalised to unit L2 norm (the paper's layer normalisation)."""
    total = {}
    for images, labels in batches:
        for name, g in head_gate_gradients(model, images, labels, prefix).items():
            total[name] = total.get(name, 0) + np.abs(g)
    return {name: v / (np.linalg.norm(v) + 1e-12) for name, v in total.items()}


def prune_heads(model, keep, prefix="blocks."):
    """The model with only the heads ``keep[block name]`` (indices) of each attention
    block; blocks not named keep all their heads. qkv keeps those heads' columns of q, k and
    v, proj their rows; the rest of the weights is copied."""
    blocks = _attention_blocks(model, prefix)
    replaced = {}
    for name, kept in keep.items():
        block = blocks[name]
        if block.ranks:  # the factors mix the heads' columns
            raise ValueError(f"{name} is factorised (low rank); prune heads before "
                             "factorize_dense")
        heads, d = block.attn.num_heads, block.attn.head_dim
        kept = sorted(set(int(h) for h in kept))
        if not kept or kept[-1] >= heads or kept[0] < 0:
            raise ValueError(f"{name}: keep a non-empty subset of its heads 0..{heads - 1}, "
                             f"got {kept}")
        if len(kept) == heads:
            continue
        new = TransformerBlock.from_config({**block.get_config(), "num_heads": len(kept),
                                            "head_dim": d})
        replaced[name] = (new, block, kept)
    clone = keras.models.clone_model(
        model, clone_function=lambda layer: replaced.get(layer.name, (layer,))[0])
    for new, old, kept in replaced.values():
        _copy_kept_heads(new, old, kept)
    return keras.Model(clone.input, clone.output, name=f"{model.name}_pruned_heads")


def _copy_kept_heads(new, old, kept):
    heads, d = old.attn.num_heads, old.attn.head_dim
    inner = heads * d
    cols = np.concatenate([np.arange(h * d, (h + 1) * d) for h in kept])
    qkv_cols = np.concatenate([part * inner + cols for part in range(3)])
    old_by_path = {w.path.split("/", 1)[1]: keras.ops.convert_to_numpy(w) for w in old.weights}
    for w in new.weights:
        tail = w.path.split("/", 1)[1]
        value = old_by_path[tail]
        if tail == "attn/qkv/kernel":
            value = value[:, qkv_cols]
        elif tail == "attn/qkv/bias":
            value = value[qkv_cols]
        elif tail == "attn/proj/kernel":
            value = value[cols]
        w.assign(value)


def least_important_heads_removed(importance, fraction):
    """{block: kept head indices}: the ``fraction`` of all heads with the lowest importance
    removed (globally ranked, as the paper's iterative pruning does), every block keeping at
    least one head."""
    ranked = sorted((score, name, h) for name, v in importance.items()
                    for h, score in enumerate(v))
    budget = int(round(fraction * len(ranked)))
    keep = {name: set(range(len(v))) for name, v in importance.items()}
    for score, name, h in ranked:
        if budget == 0:
            break
        if len(keep[name]) > 1:
            keep[name].discard(h)
            budget -= 1
    return {name: sorted(v) for name, v in keep.items()}


def count_heads(model, prefix="blocks."):
    """{block name: heads} of the model's prunable attention blocks."""
    return {name: block.attn.num_heads for name, block in _attention_blocks(model, prefix).items()}


def prune_heads_iteratively(model, batches, fraction, steps=1, fine_tune=None,
                            prefix="blocks."):
    """Michel et al.'s iterative pruning: ``fraction`` of all heads removed in ``steps``
    equal rounds, the importance measured again on the pruned model before each round, and
    ``fine_tune(model)`` (optional; returns the model, e.g. after a few fit steps) run after
    each. Returns the pruned model."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    total = sum(count_heads(model, prefix).values())
    if not total:
        raise ValueError(f"{model.name} has no multi-head attention blocks named {prefix}<i>")
    target, removed = int(round(fraction * total)), 0
    for step in range(1, steps + 1):
        now = int(round(target * step / steps)) - removed
        if now <= 0:
            continue
        current = sum(count_heads(model, prefix).values())
        keep = least_important_heads_removed(head_importance(model, batches, prefix),
                                             now / current)
        model = prune_heads(model, keep, prefix)
        removed += current - sum(count_heads(model, prefix).values())
        if fine_tune is not None:
            model = fine_tune(model)
    return model
