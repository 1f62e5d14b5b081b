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
