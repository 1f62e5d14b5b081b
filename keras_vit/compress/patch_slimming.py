"""Patch slimming (Tang et al., CVPR 2022, "Patch Slimming for Efficient Vision Transformers",
arXiv 2106.02852): fewer patch tokens in deeper blocks of a ViT/DeiT, chosen top-down.

The paper. Block l of the slimmed transformer computes its output only for the patches of a
mask m_l, while its attention still reads every token block l-1 gave it (diag(m_l) masks the
rows of the attention map P_l, not its columns), and m_l is a subset of m_(l-1). The masks
are searched top-down: the last block needs only the class token (m_L = [CLS]), and going
down, layer l keeps the fewest patches (in steps of a granularity r_0) whose removal keeps
the error of the next layer's features within a tolerance epsilon, the candidates ranked by
a significance score: patch i's approximate impact on the final output, s_(l,i) = sum over
the heads of the layers above of ||A[:, i]||^2 ||U[i, :]||^2, with A the product of the
masked attention maps from the last layer down (diag(m_L) P_L ... diag(m_(l+1)) P_(l+1)) and
U the head's output features of token i; each layer is fine-tuned as its mask is set.

Here. ``slim_patches(model, keep)`` builds that network for the counts ``keep`` (keep[l]
patches out of block l, non-increasing): block l, a ``PatchSlimmedBlock`` sharing the
original block's weights, projects q, k, v for every token it receives, attends from its
prefix tokens and its keep[l] most important patches over all of them, and runs the
residual branches and MLP on those tokens only; the next block gets only them. With
global_pool="token" the head reads the prefix tokens alone, so the last block's patches
(keep[-1] = 0, the paper's m_L) cost nothing to drop: the output is unchanged.
``patch_slimming_schedule(model, images, tolerance)`` searches the counts top-down as the
paper does, on a data sample. Departures, and why:

* Per image, in the graph: the selection is recomputed for each image at inference (top-k
  and gather, builtin TFLite ops), as the paper's dynamic variant (DPS-ViT) selects per input,
  rather than one static mask for all images; the schedule fixes only the counts, which
  keeps every shape static for export.
* The score: at inference the attention maps of the blocks above block l have not been
  computed when block l must choose, so the paper's top-down product A is truncated to its
  one available factor, block l's own attention, and to the rows the final output reads
  (the prefix tokens: m_L). Patch i's score is sum over heads h and prefix tokens c of
  P_h[c, i]^2 ||v_h[i]||^2, the squared size of patch i's term in the [CLS] token's head
  outputs of block l (the paper's ||A[:, i]||^2 ||U[i, :]||^2 with A -> P_h[prefix, i] and
  U -> the value v_h[i]). It costs no extra projection: the block projects every token's q,
  k, v anyway (the keys and values of its attention).
* The search: the counts are searched top-down with the same per-image selection that the
  slimmed model runs, and the error is the relative error of the model's output (logits)
  on the sample, ||y_slim - y|| / ||y||, rather than the next layer's features, so the
  tolerance bounds what a user sees. The candidates of layer l are scanned upwards from
  keep[l+1] in steps of ``granularity`` (the paper's r_0, default ceil(sqrt(N))), and the
  last step is refined one patch at a time, so the count is the fewest a scan by one would
  find at the cost of about 2 sqrt(N) trials. There is no fine-tuning between layers (the
  paper fine-tunes each layer as its mask is set): the result is meant to work with the
  original weights; fine-tuning afterwards is ordinary ``fit`` on the slimmed model.
"""

import math
import warnings

import keras
import numpy as np
from keras import ops

from keras_vit.compress.layers import block_layers
from keras_vit.layers.attention import MultiHeadAttention, merge_heads, split_heads
from keras_vit.layers.blocks import TransformerBlock
from keras_vit.layers.pooling import TokenPool, TokensToMap
from keras_vit.layers.regularization import LayerDrop


def _gather_tokens(x, indices):
    """(B, N, C) tokens, (B, K) int indices -> (B, K, C): each image's own rows, as one
    builtin GATHER over the flattened batch."""
    n, k, c = x.shape[1], indices.shape[1], x.shape[2]
    offsets = ops.arange(ops.shape(x)[0], dtype=indices.dtype) * n
    flat = ops.reshape(x, (-1, c))
    return ops.reshape(ops.take(flat, ops.reshape(indices + offsets[:, None], (-1,)), axis=0),
                       (-1, k, c))


def patch_scores(attn, q, k, v, num_prefix_tokens):
    """(B, N - prefix) importance of the patch tokens for the prefix tokens' attention
    outputs: sum over heads and prefix queries of P[c, i]^2 ||v_i||^2, from the block's
    q, k, v (B, H, N, d)."""
    p = num_prefix_tokens
    probs = ops.softmax(attn.scores(q[:, :, :p], k), axis=-1)[:, :, :, p:]  # (B, H, p, n)
    value_sq = ops.sum(ops.square(v[:, :, p:]), axis=-1)  # (B, H, n)
    return ops.sum(ops.square(probs) * value_sq[:, :, None, :], axis=(1, 2))


def slimmed_block_call(block, x, keep, num_prefix_tokens, training=None):
    """``block`` (a TransformerBlock, dense attention) on tokens ``x`` (B, N, D), computed
    only for the prefix tokens and the ``keep`` patches of highest ``patch_scores``, each
    image its own: (B, prefix + keep, D), the prefix first, then the patches by falling
    score. Equal to those rows of ``block(x)``: the attention reads every token of ``x``."""
    attn, p = block.attn, num_prefix_tokens
    h = block.norm1(x) if block.norm_first else x
    q, k, v = attn.project_qkv(h)
    if keep:
        _, top = ops.top_k(patch_scores(attn, q, k, v, p), keep)
        prefix = ops.zeros_like(top[:, :1]) + ops.arange(p, dtype=top.dtype)[None, :]
        kept = ops.concatenate([prefix, top + p], axis=1)
        q = split_heads(_gather_tokens(merge_heads(q), kept), attn.num_heads)
        x = _gather_tokens(x, kept)
    else:  # the prefix tokens alone: a slice
        q, x = q[:, :, :p], x[:, :p]
    mixed = merge_heads(attn.attend(q, k, v, training=training))
    mixed = attn.proj_dropout(attn.proj(mixed), training=training)
    if block.ls1 is not None:
        mixed = block.ls1(mixed)

    def mlp(t):
        out = block.mlp(t, training=training)
        return block.ls2(out) if block.ls2 is not None else out

    # ResidualBlock.call's two residual branches, on the kept tokens
    if block.norm_first:
        x = x + block.drop_path(mixed, training=training)
        return x + block.drop_path(mlp(block.norm2(x)), training=training)
    x = block.norm1(x + block.drop_path(mixed, training=training))
    return block.norm2(x + block.drop_path(mlp(x), training=training))


@keras.saving.register_keras_serializable(package="keras_vit")
class PatchSlimmedBlock(keras.layers.Layer):
    """A TransformerBlock (dense multi-head attention) that outputs only its prefix tokens
    and the ``keep`` patch tokens most important to them, per image
    (``slimmed_block_call``): (B, N, D) -> (B, num_prefix_tokens + keep, D). The block is a
    sublayer: its weights are the wrapped block's."""

    def __init__(self, block, keep, num_prefix_tokens=1, **kwargs):
        super().__init__(**kwargs)
        if isinstance(block, dict):
            block = keras.saving.deserialize_keras_object(block)
        if type(block) is not TransformerBlock or type(block.attn) is not MultiHeadAttention:
            raise ValueError("PatchSlimmedBlock wraps a TransformerBlock with dense "
                             f"MultiHeadAttention, got {type(block).__name__}")
        self.block, self.keep = block, int(keep)
        self.num_prefix_tokens = int(num_prefix_tokens)
        if self.keep < 0 or self.num_prefix_tokens < 1:
            raise ValueError(f"keep must be >= 0 and num_prefix_tokens >= 1, got {keep}, "
                             f"{num_prefix_tokens}")

    def build(self, x_shape):
        if not self.block.built:
            self.block.build(x_shape)

    def call(self, x, training=None):
        return slimmed_block_call(self.block, x, self.keep, self.num_prefix_tokens, training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_prefix_tokens + self.keep, input_shape[2])

    def get_config(self):
        return {**super().get_config(), "block": keras.saving.serialize_keras_object(self.block),
                "keep": self.keep, "num_prefix_tokens": self.num_prefix_tokens}


def _slimming_layout(model, prefix="blocks."):
    """([blocks in order], prefix tokens, patches) of a ViT/DeiT-style model; ValueError
    when it is not one: top-level ``blocks.<i>`` TransformerBlocks with dense
    MultiHeadAttention, each called once on the same (N, D) tokens, and a head that reads
    the class token (global_pool="token")."""
    expected = ("patch slimming expects a ViT/DeiT-style classifier: top-level TransformerBlocks "
                "'blocks.<i>' with dense MultiHeadAttention over one token sequence and a "
                "[CLS] prefix token read by the head (class_token=True, global_pool='token')")
    found = block_layers(model, prefix)
    blocks = [found[i] for i in sorted(found)]
    if not blocks or sorted(found) != list(range(len(blocks))):
        raise ValueError(f"{expected}; {model.name} has no blocks 0..n-1 named {prefix}<i>")
    for block in blocks:  # exactly: a subclass may change the branches slimmed_block_call runs
        if type(block) is not TransformerBlock or type(block.attn) is not MultiHeadAttention:
            raise ValueError(f"{expected}; {block.name} is a {type(block).__name__} with "
                             f"{type(getattr(block, 'attn', None)).__name__}")
    try:
        shapes = {tuple(block.input.shape[1:]) for block in blocks}
    except (AttributeError, ValueError):  # a block called more than once
        raise ValueError(f"{expected}; {model.name} calls a block more than once") from None
    pools = [layer for layer in model.layers if isinstance(layer, TokenPool)]
    if any(isinstance(layer, TokensToMap) for layer in model.layers):
        raise ValueError(f"{expected}; {model.name} outputs token maps (features_only)")
    if len(shapes) != 1 or not pools or any(pool.mode != "token" for pool in pools):
        raise ValueError(f"{expected}; {model.name} pools "
                         f"{[pool.mode for pool in pools] or 'no tokens'}")
    num_tokens = next(iter(shapes))[0]
    num_prefix = pools[0].num_prefix_tokens
    if not num_tokens or num_prefix < 1 or any(pool.index >= num_prefix for pool in pools):
        raise ValueError(f"{expected}; {model.name} has {num_prefix} prefix tokens")
    return blocks, num_prefix, num_tokens - num_prefix


def _check_keep(keep, depth, num_patches):
    """``keep`` as a list of ``depth`` ints (a shorter list: the later blocks keep its last
    count); ValueError unless non-increasing counts in 0..num_patches, at most depth."""
    try:
        keep = [int(k) for k in keep]
    except TypeError:
        raise ValueError(f"keep must be a sequence of patch counts, got {keep!r}") from None
    if not keep or len(keep) > depth:
        raise ValueError(f"keep must give 1..{depth} patch counts (one per block), got "
                         f"{len(keep)}: {keep}")
    if any(k < 0 or k > num_patches for k in keep):
        raise ValueError(f"keep counts must be in 0..{num_patches} (the model's patches), "
                         f"got {keep}")
    if any(b > a for a, b in zip(keep, keep[1:])):
        raise ValueError(f"keep must be non-increasing with depth (a patch dropped before a "
                         f"block cannot come back), got {keep}")
    return keep + [keep[-1]] * (depth - len(keep))


def slim_patches(model, keep, name=None):
    """``model`` (a ViT/DeiT-style classifier, see ``_slimming_layout``) with block l
    computing only the prefix tokens and the ``keep[l]`` patch tokens most important to
    them, per image (``PatchSlimmedBlock``); block l+1 gets only those. ``keep``:
    non-increasing counts, one per block (a shorter list: later blocks keep its last count);
    a block that keeps every patch it gets stays the original layer, so keeping all patches
    is the original model. Weights are shared with ``model`` (not copied); LayerDrop layers
    are replaced by their inference behaviour. The result saves, loads (after ``import
    keras_vit.compress``) and exports as any functional model."""
    blocks, num_prefix, num_patches = _slimming_layout(model)
    keep = _check_keep(keep, len(blocks), num_patches)
    replaced, received = {}, num_patches
    for block, count in zip(blocks, keep):
        if count < received:
            replaced[block.name] = PatchSlimmedBlock(block, count, num_prefix,
                                                     name=f"{block.name}_slim")
        received = count

    def call(layer, *args, **kwargs):
        if isinstance(layer, LayerDrop):  # its input and output differ in tokens now
            return args[0][1]
        return replaced.get(layer.name, layer)(*args, **kwargs)

    slim = keras.models.clone_model(model, clone_function=lambda layer: layer,
                                    call_function=call)
    return keras.Model(slim.input, slim.output, name=name or f"{model.name}_slim")


def _relative_error(outputs, reference):
    outputs, reference = keras.tree.flatten(outputs), keras.tree.flatten(reference)
    diff = sum(float(np.sum(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for a, b in zip(outputs, reference))
    size = sum(float(np.sum(np.square(np.asarray(b, np.float64)))) for b in reference)
    return math.sqrt(diff / max(size, 1e-30))


def _tail_model(model, last_block):
    """The model's layers after its last block (final norm, pooling, head) as a model of
    (B, any number of tokens, D), sharing their weights."""
    start = last_block.output
    for layer in model.layers:  # LayerDrop's output is the block's, at inference
        if isinstance(layer, LayerDrop) and layer.input[1] is start:
            start = layer.output
    tail = keras.Model(start, model.outputs)
    return keras.models.clone_model(tail, input_tensors=keras.Input((None, start.shape[-1])),
                                    clone_function=lambda layer: layer)


def patch_slimming_schedule(model, images, tolerance=0.01, granularity=None,
                            return_errors=False):
    """Kept patch counts per block (non-increasing with depth) for ``slim_patches``,
    searched top-down on the sample ``images`` as the paper does: from the last block to
    the first, each block keeps the fewest patches (at least as many as the block after
    it) for which the slimmed model's output stays within ``tolerance`` of the original's,
    as the relative error ||y_slim - y|| / ||y|| over the sample, the later blocks already
    slimmed. Candidates are scanned upwards in steps of ``granularity`` (default
    ceil(sqrt(patches))), then refined one patch at a time within the last step.
    ``return_errors``: also the final schedule's error on the sample (<= tolerance)."""
    blocks, num_prefix, num_patches = _slimming_layout(model)
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0 (a relative output error), got {tolerance}")
    step = int(granularity) if granularity else math.isqrt(max(num_patches - 1, 0)) + 1
    if step < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    images = np.asarray(images, dtype="float32")
    reference = model(images, training=False)
    inputs = keras.Model(model.input, [block.input for block in blocks])(images, training=False)
    inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    tail = _tail_model(model, blocks[-1])

    keep = [num_patches] * len(blocks)
    cache = {}

    def error(layer, count):
        """The output error with block ``layer`` keeping ``count``, the later blocks their
        ``keep`` and the earlier ones every patch (top-down, they are not slimmed yet)."""
        x, received = inputs[layer], num_patches
        for block, kept in zip(blocks[layer:], [count] + keep[layer + 1:]):
            with warnings.catch_warnings():  # a trial may leave a block the prefix alone
                warnings.filterwarnings("ignore", "You are using a softmax over axis")
                x = (slimmed_block_call(block, x, kept, num_prefix) if kept < received
                     else block(x, training=False))
            received = kept
        cache[layer, count] = _relative_error(tail(x, training=False), reference)
        return cache[layer, count]

    for layer in reversed(range(len(blocks))):
        low = keep[layer + 1] if layer + 1 < len(blocks) else 0
        # keeping every patch here is the schedule already accepted one block up
        passing, failed = num_patches, low - 1
        for count in range(low, num_patches, step):
            if error(layer, count) <= tolerance:
                passing = count
                break
            failed = count
        for count in range(failed + 1, passing):
            if error(layer, count) <= tolerance:
                passing = count
                break
        keep[layer] = passing
    final = cache[0, keep[0]] if (0, keep[0]) in cache else error(0, keep[0])
    return (keep, final) if return_errors else keep
