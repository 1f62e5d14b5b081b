"""Fewer blocks at inference: LayerDrop's pruning (Fan et al. 2019, "Reducing Transformer
Depth on Demand with Structured Dropout"). A model trained with ``layer_drop`` (ViT/DeiT:
``create_model(..., layer_drop=0.2)``) tolerates missing blocks; ``keep_blocks`` removes
the others, giving a shallower model with the kept blocks' own weights, no retraining."""

import keras


def every_other_block(depth, keep):
    """The ``keep`` block indices spread evenly over ``depth`` (the paper's "every other
    layer" strategy, generalised): e.g. depth 12, keep 6 -> 0, 2, 4, 6, 8, 10."""
    if not 1 <= keep <= depth:
        raise ValueError(f"keep must be in 1..{depth}, got {keep}")
    return sorted({int(i * depth / keep) for i in range(keep)})


def block_layers(model, prefix="blocks."):
    """{index: layer} of the model's top-level blocks named ``prefix``<i>."""
    found = {}
    for layer in model.layers:
        tail = layer.name[len(prefix):] if layer.name.startswith(prefix) else ""
        if tail.isdigit():
            found[int(tail)] = layer
    return found


def keep_blocks(model, keep, prefix="blocks.", name=None):
    """A model of ``model``'s layers without the blocks whose index is not in ``keep``: each
    removed block passes its input on (its residual stream continues unchanged). Weights are
    shared with ``model`` (not copied); the result saves, loads and exports as any
    functional model."""
    blocks = block_layers(model, prefix)
    if not blocks:
        raise ValueError(f"{model.name} has no top-level layers named {prefix}<i>")
    keep = sorted(set(int(i) for i in keep))
    unknown = [i for i in keep if i not in blocks]
    if unknown or not keep:
        raise ValueError(f"keep must be a non-empty subset of the blocks 0..{max(blocks)}, "
                         f"got {keep}")
    removed = {blocks[i].name for i in blocks if i not in keep}

    def call(layer, *args, **kwargs):
        if layer.name in removed:
            return args[0]
        return layer(*args, **kwargs)

    pruned = keras.models.clone_model(model, clone_function=lambda layer: layer,
                                      call_function=call)
    return keras.Model(pruned.input, pruned.output,
                       name=name or f"{model.name}_{len(keep)}of{len(blocks)}_blocks")


def with_attention(model, attention, attention_args=None, prefix="blocks."):
    """The model with every TransformerBlock's mixer swapped for ``attention`` (linear, topk,
    bigbird: the kinds that keep the dense layer's qkv/proj weights), all weights copied: a
    trained dense model becomes e.g. its linear-attention twin, to fine-tune."""
    from keras_vit.layers.blocks import TransformerBlock

    blocks = {b.name: b for b in block_layers(model, prefix).values()
              if isinstance(b, TransformerBlock)}
    if not blocks:
        raise ValueError(f"{model.name} has no TransformerBlocks named {prefix}<i>")
    replaced = {name: TransformerBlock.from_config(
        {**b.get_config(), "attention": attention, "attention_args": dict(attention_args or {})})
        for name, b in blocks.items()}
    clone = keras.models.clone_model(
        model, clone_function=lambda layer: replaced.get(layer.name, layer))
    for name, new in replaced.items():
        old = {w.path.split("/", 1)[1]: w for w in blocks[name].weights}
        tails = [w.path.split("/", 1)[1] for w in new.weights]
        if sorted(tails) != sorted(old):
            raise ValueError(f"attention={attention!r} does not keep the dense layer's weights "
                             f"(its own: {sorted(set(tails) - set(old))}); use one that does")
        for w, tail in zip(new.weights, tails):
            w.assign(old[tail])
    return keras.Model(clone.input, clone.output, name=f"{model.name}_{attention}")
