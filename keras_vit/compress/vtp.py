"""Vision Transformer Pruning (VTP; Zhu, Tang, Han 2021, "Vision Transformer Pruning"):
train with an L1 penalty on learnable per-dimension gates, remove the dimensions whose gate
is small, fine-tune the smaller, ordinary model.

Gated, per TransformerBlock: the attention's inner dimensions (one gate g_j multiplies q_j,
k_j and v_j, so the score term q_j k_j carries g_j^2 and the value v_j carries g_j) and the
MLP's hidden units (g multiplies the hidden activation before fc2). A dimension whose gate
is 0 contributes nothing, so removing it is exact; the kept gates are folded into the
weights (q, k and v columns and biases times g, fc2 rows times g; q's also times
sqrt(n / head_dim), as the pruned attention scales its scores by 1/sqrt(n)), so the pruned
model computes what the gated model did. Every head of a block keeps the same number of
dimensions, as the heads' reshape needs.

Workflow: ``gated = add_dimension_gates(model, l1)``; ``gated.fit(...)`` (the blocks add
l1 * sum|g| to the loss in training; exclude the gates from weight decay, e.g. AdamW's
``exclude_from_weight_decay(var_names=["gates"])``, to optimise the paper's objective);
``pruned, dims = prune_dimensions(gated, fraction=0.3)``; ``pruned.fit(...)``."""

import numbers

import keras
import numpy as np
from keras import ops

from keras_vit.compress.heads import _attention_blocks
from keras_vit.compress.layers import block_layers
from keras_vit.layers.attention import merge_heads
from keras_vit.layers.blocks import TransformerBlock


@keras.saving.register_keras_serializable(package="keras_vit")
class GatedTransformerBlock(TransformerBlock):
    """TransformerBlock (dense attention) with VTP's dimension gates: ``attn_gates``
    (num_heads * head_dim,) on q, k and v, ``mlp_gates`` (hidden,) on the MLP's hidden
    activation, both initialised to 1 (the block then equals the ungated one). In training
    it adds ``gate_l1 * (sum|attn_gates| + sum|mlp_gates|)`` to the model's losses."""

    def __init__(self, dim, num_heads, gate_l1=1e-4, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.gate_l1 = float(gate_l1)

    def build(self, x_shape, *mixer_shapes):
        super().build(x_shape, *mixer_shapes)
        self.attn_gates = self.add_weight(name="attn_gates", shape=(self.attn.inner_dim,),
                                          initializer="ones")
        self.mlp_gates = self.add_weight(name="mlp_gates", shape=(self.mlp.hidden_features,),
                                         initializer="ones")

    def mix(self, x, attention_mask=None, bias=None, training=None):
        # MultiHeadAttention.call with the gates on q, k and v between projection and scores
        attn = self.attn
        q, k, v = attn.project_qkv(x)
        g = ops.reshape(ops.cast(self.attn_gates, q.dtype), (1, attn.num_heads, 1, attn.head_dim))
        out = merge_heads(attn.attend(q * g, k * g, v * g, mask=attention_mask, bias=bias,
                                      training=training))
        return attn.proj_dropout(attn.proj(out), training=training)

    def feed_forward(self, x, training=None):
        mlp = self.mlp
        h = mlp.drop1(mlp.act_fn(mlp.fc1(x)), training=training)
        h = h * ops.cast(self.mlp_gates, h.dtype)
        return mlp.drop2(mlp.fc2(h), training=training)

    def call(self, x, *args, training=None, **kwargs):
        if training and self.gate_l1:
            self.add_loss(self.gate_l1 * (ops.sum(ops.abs(self.attn_gates))
                                          + ops.sum(ops.abs(self.mlp_gates))))
        return super().call(x, *args, training=training, **kwargs)

    def get_config(self):
        return {**super().get_config(), "gate_l1": self.gate_l1}


def _gated_blocks(model, prefix):
    return {block.name: block for _, block in sorted(block_layers(model, prefix).items())
            if isinstance(block, GatedTransformerBlock)}


def _copy(layer):
    return layer.__class__.from_config(layer.get_config())


def _rebuilt(model, replaced, name, transform=None):
    """``model`` with the layers ``replaced[name]`` swapped in and every other layer a copy,
    all weights copied from ``model`` by path (``transform(layer name, path tail, value)``
    reshapes a replaced block's), so the result shares no variable with ``model``. Weights
    ``model`` lacks (new gates) keep their initial values."""
    clone = keras.models.clone_model(
        model, clone_function=lambda layer: replaced.get(layer.name) or _copy(layer))
    for layer in clone.layers:
        if not layer.weights:
            continue
        old = {w.path: keras.ops.convert_to_numpy(w) for w in model.get_layer(layer.name).weights}
        for w in layer.weights:
            if w.path in old:
                value = old[w.path]
                if transform is not None and layer.name in replaced:
                    value = transform(layer.name, w.path.split("/", 1)[1], value)
                w.assign(value)
    return keras.Model(clone.input, clone.output, name=name)


def add_dimension_gates(model, l1=1e-4, prefix="blocks."):
    """A copy of ``model`` whose dense-attention TransformerBlocks named ``prefix``<i> are
    GatedTransformerBlocks with gates 1 (the same outputs as ``model``) and L1 weight ``l1``;
    other blocks are kept as they are. All weights are copied: ``model`` is unchanged."""
    if not (isinstance(l1, numbers.Real) and l1 >= 0):
        raise ValueError(f"l1 must be a number >= 0, got {l1!r}")
    blocks = _attention_blocks(model, prefix)
    if not blocks:
        raise ValueError(f"{model.name} has no TransformerBlocks with multi-head attention "
                         f"named {prefix}<i>")
    replaced = {name: GatedTransformerBlock.from_config({**block.get_config(), "gate_l1": l1})
                for name, block in blocks.items()}
    return _rebuilt(model, replaced, f"{model.name}_gated")


def dimension_gates(model, prefix="blocks."):
    """{block name: {"attn": (num_heads * head_dim,), "mlp": (hidden,)}} of the gated
    model's gates, as numpy arrays."""
    return {name: {"attn": keras.ops.convert_to_numpy(block.attn_gates),
                   "mlp": keras.ops.convert_to_numpy(block.mlp_gates)}
            for name, block in _gated_blocks(model, prefix).items()}


def _pruned_masks(gates, threshold, fraction):
    """{block: {kind: bool mask, True = pruned}}: |g| <= threshold, or the ``fraction`` of
    each kind's gates (all blocks together) with the smallest |g|."""
    if threshold is not None:
        return {name: {kind: np.abs(g) <= threshold for kind, g in kinds.items()}
                for name, kinds in gates.items()}
    masks = {name: {} for name in gates}
    for kind in ("attn", "mlp"):
        values = np.concatenate([np.abs(gates[name][kind]) for name in gates])
        pruned = np.zeros(values.size, bool)
        pruned[np.argsort(values, kind="stable")[:int(round(fraction * values.size))]] = True
        start = 0
        for name in gates:
            size = gates[name][kind].size
            masks[name][kind] = pruned[start:start + size]
            start += size
    return masks


def _kept_attn_dims(g, heads, pruned):
    """Flat indices of the kept attention dims: n = the kept count's mean per head (rounded
    half up, 1..head_dim), each head's n largest |g|, in their order."""
    d = g.size // heads
    n = int(np.clip(np.floor((~pruned).sum() / heads + 0.5), 1, d))
    largest = np.argsort(-np.abs(g).reshape(heads, d), axis=1, kind="stable")[:, :n]
    return (np.sort(largest, axis=1) + d * np.arange(heads)[:, None]).reshape(-1), n


def prune_dimensions(gated_model, threshold=None, fraction=None, prefix="blocks."):
    """(the pruned model, {block name: {"head_dim": n, "mlp_hidden_dim": m}}): each gated
    block becomes a TransformerBlock without gates that keeps the dims whose gate survives,
    the gates folded into its weights; other layers and weights are copied. Give one of
    ``threshold`` (|g| <= threshold is pruned) or ``fraction`` (that share of all attention
    dims, and of all MLP units, with the smallest |g|, ranked across blocks). Every block
    keeps at least one dim per head and one hidden unit; a head keeps its n largest |g|,
    n the block's kept count per head rounded, so a head may keep a dim the threshold
    pruned or lose one it kept."""
    if (threshold is None) == (fraction is None):
        raise ValueError("give exactly one of threshold (prune |g| <= threshold) or fraction "
                         f"(of the gated dims to prune), got threshold={threshold!r}, "
                         f"fraction={fraction!r}")
    if threshold is not None and not (isinstance(threshold, numbers.Real) and threshold >= 0):
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    if fraction is not None and not (isinstance(fraction, numbers.Real) and 0 <= fraction < 1):
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    blocks = _gated_blocks(gated_model, prefix)
    if not blocks:
        raise ValueError(f"{gated_model.name} has no gated blocks named {prefix}<i>; gate a "
                         "model with add_dimension_gates first")
    gates = dimension_gates(gated_model, prefix)
    masks = _pruned_masks(gates, threshold, fraction)
    replaced, plans, dims = {}, {}, {}
    for name, block in blocks.items():
        g = gates[name]
        attn_idx, n = _kept_attn_dims(g["attn"], block.attn.num_heads, masks[name]["attn"])
        mlp_idx = np.flatnonzero(~masks[name]["mlp"])
        if not mlp_idx.size:
            mlp_idx = np.array([np.argmax(np.abs(g["mlp"]))])
        config = {k: v for k, v in block.get_config().items() if k != "gate_l1"}
        replaced[name] = TransformerBlock.from_config(
            {**config, "head_dim": n, "mlp_hidden_dim": int(mlp_idx.size)})
        inner, kept = g["attn"].size, g["attn"][attn_idx]
        qkv_idx = np.concatenate([part * inner + attn_idx for part in range(3)])
        # the pruned block scores with 1/sqrt(n), the gated one with 1/sqrt(head_dim): q's
        # columns carry the ratio sqrt(n / head_dim) so the logits stay the same
        q_ratio = np.sqrt(n / block.attn.head_dim)
        # (kept indices, gates folded in) on the output side (columns, bias) of qkv and fc1,
        # the input side (rows) of proj and fc2
        plans[name] = ({"attn/qkv": (qkv_idx, np.concatenate([kept * q_ratio, kept, kept])),
                        "mlp/fc1": (mlp_idx, None)},
                       {"attn/proj": (attn_idx, None), "mlp/fc2": (mlp_idx, g["mlp"][mlp_idx])})
        dims[name] = {"head_dim": n, "mlp_hidden_dim": int(mlp_idx.size)}

    def transform(name, tail, value):
        layer, weight = tail.rsplit("/", 1)
        out_side, in_side = plans[name]
        if layer in out_side and weight in ("kernel", "kernel_b", "bias"):  # LowRankDense: B
            idx, scale = out_side[layer]
            value = value[..., idx]
            return value if scale is None else value * scale
        if layer in in_side and weight in ("kernel", "kernel_a"):  # LowRankDense: A
            idx, scale = in_side[layer]
            value = value[idx]
            return value if scale is None else value * scale[:, None]
        return value

    name = gated_model.name.removesuffix("_gated")
    return _rebuilt(gated_model, replaced, f"{name}_pruned_dims", transform), dims
