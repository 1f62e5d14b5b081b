"""Low-rank factorisation of the blocks' linear layers (the survey's "low-rank
decomposition"): each Dense kernel W (in x out) of a TransformerBlock (qkv, proj, fc1, fc2)
becomes A (in x r) B (r x out) from its truncated SVD, r the fewest singular values that
keep ``energy`` of sum(sigma^2), where that has fewer weights than W. The result is an
ordinary Keras model (``LowRankDense`` layers), to fine-tune, save and export."""

import keras
import numpy as np

from keras_vit.compress.layers import block_layers
from keras_vit.layers.blocks import TransformerBlock

LINEAR_LAYERS = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"), "fc1": ("mlp", "fc1"),
                 "fc2": ("mlp", "fc2")}


def energy_rank(singular_values, energy):
    """The smallest r whose first r singular values hold ``energy`` of sum(sigma^2)."""
    kept = np.cumsum(np.square(singular_values)) / np.sum(np.square(singular_values))
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(singular_values)))


def truncated_factors(kernel, rank):
    """(A, B) with A @ B the best rank-``rank`` approximation of ``kernel`` (Eckart-Young)."""
    u, s, vt = np.linalg.svd(kernel, full_matrices=False)
    return u[:, :rank] * s[:rank], vt[:rank]


def _block_kernels(model, prefix):
    """[(block, {layer key: kernel as numpy})] of the model's unfactorised TransformerBlocks."""
    return [(block, {key: keras.ops.convert_to_numpy(getattr(getattr(block, part), name).kernel)
                     for key, (part, name) in LINEAR_LAYERS.items()})
            for _, block in sorted(block_layers(model, prefix).items())
            if isinstance(block, TransformerBlock) and not block.ranks]


def _ranks_at(kernels, spectra, energy):
    """{layer key: rank} of the layers worth factorising at ``energy``."""
    ranks = {}
    for key, kernel in kernels.items():
        rank = energy_rank(spectra[key], energy)
        if rank * sum(kernel.shape) < kernel.size:
            ranks[key] = rank
    return ranks


def energy_for_fraction(model, fraction, prefix="blocks."):
    """The largest kept energy (to 1e-4) at which the factorised blocks' linear layers hold
    at most ``fraction`` of their dense weights (one energy for all layers, so each keeps
    the rank its spectrum needs)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    blocks = _block_kernels(model, prefix)
    spectra = [{k: np.linalg.svd(w, compute_uv=False) for k, w in kernels.items()}
               for _, kernels in blocks]
    dense = sum(w.size for _, kernels in blocks for w in kernels.values())

    def weights_at(energy):
        total = 0
        for (_, kernels), spectrum in zip(blocks, spectra):
            ranks = _ranks_at(kernels, spectrum, energy)
            total += sum(ranks[k] * sum(w.shape) if k in ranks else w.size
                         for k, w in kernels.items())
        return total

    low, high = 0.0, 1.0  # weights_at rises with the energy
    while high - low > 1e-4:
        mid = (low + high) / 2
        low, high = (mid, high) if weights_at(mid) <= fraction * dense else (low, mid)
    return low


def factorize_dense(model, energy=0.9, prefix="blocks.", param_fraction=None):
    """(the factorised model, {block name: {layer: rank}}). Blocks other than
    TransformerBlock, and layers whose factors would not be smaller, are kept as they are;
    weights are copied (the input model is unchanged). ``param_fraction`` instead of
    ``energy``: the energy at which the blocks' linear layers keep that fraction of their
    weights (``energy_for_fraction``)."""
    if param_fraction is not None:
        energy = energy_for_fraction(model, param_fraction, prefix)
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    replaced, ranks_of = {}, {}
    for block, kernels in _block_kernels(model, prefix):
        spectra = {k: np.linalg.svd(w, compute_uv=False) for k, w in kernels.items()}
        ranks = _ranks_at(kernels, spectra, energy)
        factors = {k: truncated_factors(kernels[k], r) for k, r in ranks.items()}
        if ranks:
            replaced[block.name] = (TransformerBlock.from_config(
                {**block.get_config(), "ranks": ranks}), block, factors)
            ranks_of[block.name] = ranks
    if not replaced:
        return model, {}
    clone = keras.models.clone_model(
        model, clone_function=lambda layer: replaced.get(layer.name, (layer,))[0])
    for new, old, factors in replaced.values():
        _copy_weights(new, old, factors)
    return keras.Model(clone.input, clone.output, name=f"{model.name}_low_rank"), ranks_of


def _copy_weights(new, old, factors):
    old_by_path = {w.path.split("/", 1)[1]: w for w in old.weights}
    for w in new.weights:
        tail = w.path.split("/", 1)[1]
        layer = tail.split("/")[-2]
        if tail.endswith("kernel_a") or tail.endswith("kernel_b"):
            a, b = factors[layer]
            w.assign(a if tail.endswith("kernel_a") else b)
        else:
            w.assign(old_by_path[tail])
