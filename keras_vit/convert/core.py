"""timm / PyTorch state dict -> Keras weights, by layer names that mirror timm's module paths.

Each Keras layer's path (``blocks.3.attn.qkv``) plus its weight's torch name
gives the timm key. Layouts are converted by layer type: Linear weights are
transposed, Conv2d OIHW -> HWIO, depthwise OIHW -> HWI1, BatchNorm statistics
renamed. Layers whose weights need more than that (position embeddings
resampled to a new grid, a family's own tensors) register a converter with
``register_layer_converter``; the family modules in this package do.
"""

import numpy as np
import keras

from keras_vit.layers.embedding import PositionEmbedding, PrefixTokens, resample_position_embedding

# Buffers timm keeps in state dicts that are constants here (built from the config).
IGNORED_SUFFIXES = ("relative_position_index", "attn_mask", "num_batches_tracked")
# Keys of classifier parts a headless / features_only model does not have.
HEAD_PREFIXES = ("head.", "head_dist.", "pre_logits.", "fc_norm.", "norm.", "head.fc.")

_LAYER_CONVERTERS = {}


def register_layer_converter(layer_cls):
    """Registers fn(layer, path, options) -> [(variable, key, to_keras(array) -> array)] for a
    layer type; ``options`` are load_timm_weights' (interpolation, antialias)."""

    def wrap(fn):
        _LAYER_CONVERTERS[layer_cls] = fn
        return fn

    return wrap


def _identity(a):
    return a


def _linear(a):
    return a.T


def _conv(a):
    return np.transpose(a, (2, 3, 1, 0))


def _depthwise(keras_shape):
    def convert(a):  # torch (in*mult, 1, kh, kw) -> keras (kh, kw, in, mult)
        kh, kw, cin, mult = keras_shape
        return np.transpose(a.reshape(cin, mult, kh, kw), (2, 3, 0, 1))

    return convert


_TORCH_NAMES = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
                "moving_mean": "running_mean", "moving_variance": "running_var"}


def _builtin_entries(layer, path):
    """Keras built-in layers: torch name and layout of each weight."""
    entries = []
    for var in layer.weights:
        name = var.name
        convert = _identity
        if isinstance(layer, keras.layers.DepthwiseConv2D) and name == "kernel":
            convert = _depthwise(tuple(var.shape))
        elif isinstance(layer, keras.layers.Conv2D) and name == "kernel":
            convert = _conv
        elif isinstance(layer, keras.layers.Conv1D) and name == "kernel":
            convert = lambda a: np.transpose(a, (2, 1, 0))  # noqa: E731
        elif isinstance(layer, keras.layers.Dense) and name == "kernel":
            convert = _linear
        elif isinstance(layer, (keras.layers.LayerNormalization, keras.layers.BatchNormalization,
                                keras.layers.GroupNormalization)):
            pass
        elif isinstance(layer, keras.layers.Embedding) and name == "embeddings":
            entries.append((var, f"{path}.weight", _identity))
            continue
        entries.append((var, f"{path}.{_TORCH_NAMES.get(name, name)}", convert))
    return entries


@register_layer_converter(PrefixTokens)
def _prefix_tokens(layer, path, options):
    # timm keeps cls_token / dist_token / det_token at the model's top level.
    top = path.rsplit(".", 1)[0] + "." if "." in path else ""
    return [(var, top + var.name, _identity) for var in layer.tokens]


@register_layer_converter(PositionEmbedding)
def _position_embedding(layer, path, options):
    top = path.rsplit(".", 1)[0] + "." if "." in path else ""

    def convert(a):
        if a.shape == tuple(layer.pos_embed.shape) or a.ndim != 3:
            return a
        return resample_position_embedding(a, layer.grid_size, layer.num_prefix_tokens,
                                           method=options.get("interpolation", "bicubic"),
                                           antialias=options.get("antialias", True))

    return [(layer.pos_embed, top + "pos_embed", convert)]


def _sublayers(layer):
    return list(getattr(layer, "_layers", []))


def weight_entries(model, options=None):
    """Every weight of the model as (variable, timm key, converter), in a stable order."""
    entries, options = [], options or {}

    def visit(layer, path):
        conv = next((fn for cls, fn in _LAYER_CONVERTERS.items() if type(layer) is cls), None)
        own = [v for v in layer._trainable_variables + layer._non_trainable_variables]
        if conv is not None:
            entries.extend(conv(layer, path, options))
        elif type(layer).__module__.startswith("keras."):
            entries.extend(_builtin_entries(layer, path))
        else:
            entries.extend((v, f"{path}.{v.name}", _identity) for v in own)
        if conv is None or not getattr(conv, "covers_sublayers", False):
            for sub in _sublayers(layer):
                visit(sub, f"{path}.{sub.name}")

    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        visit(layer, layer.name)
    return entries


def to_numpy(value):
    """A torch tensor, jax/tf array or numpy array as a float numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def load_timm_weights(model, state_dict, strict=True, interpolation="bicubic", antialias=True):
    """Loads a timm ``state_dict()`` (Mapping[str, array]) into a keras_vit model.

    A features_only model ignores the keys of the stages and head it cut off.
    Position embeddings made for another grid are resampled as timm's
    checkpoint filter does (bicubic with antialias by default; JAX .npz
    checkpoints use bilinear without, as timm's ``_load_weights``).
    strict=True: missing keys, unexpected keys and shape mismatches raise one
    ValueError that lists them all, before any weight is assigned. Returns
    (missing, unexpected) keys.
    """
    state_dict = dict(state_dict)
    for nest in ("model", "state_dict", "model_ema"):
        if nest in state_dict and isinstance(state_dict[nest], dict) and len(state_dict) <= 3:
            state_dict = dict(state_dict[nest])
            break
    top_names = {layer.name for layer in model.layers}
    entries = weight_entries(model, dict(interpolation=interpolation, antialias=antialias))
    missing, mismatched, assignments, used = [], [], [], set()
    for var, key, convert in entries:
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        try:
            value = convert(to_numpy(state_dict[key]).astype(np.float32))
        except ValueError as e:
            mismatched.append(f"{key}: {e}")
            continue
        if tuple(value.shape) != tuple(var.shape):
            mismatched.append(f"{key}: checkpoint {tuple(to_numpy(state_dict[key]).shape)} -> "
                              f"{tuple(value.shape)}, model {tuple(var.shape)}")
            continue
        assignments.append((var, value))
    # A features_only model (every output a feature map) stops after its last requested
    # stage: checkpoint keys of modules it does not have at all are that cut-off tail.
    features_model = all(len(t.shape) == 4 for t in model.outputs)
    modules = {key.rsplit(".", 1)[0] for _, key, _ in entries}
    unexpected = []
    for key in state_dict:
        if key in used or key.endswith(IGNORED_SUFFIXES):
            continue
        head = next((p for p in HEAD_PREFIXES if key.startswith(p)), None)
        if head is not None and head[:-1] not in top_names:
            continue  # a classifier the (headless / features_only) model does not have
        if features_model and key.rsplit(".", 1)[0] not in modules:
            continue
        unexpected.append(key)
    problems = []
    if mismatched:
        problems.append("shape mismatches:\n  " + "\n  ".join(mismatched))
    if strict and missing:
        problems.append("missing keys:\n  " + "\n  ".join(missing))
    if strict and unexpected:
        problems.append("unexpected keys:\n  " + "\n  ".join(unexpected))
    if problems:
        raise ValueError(f"Cannot load the checkpoint into {model.name!r}:\n" + "\n".join(problems))
    for var, value in assignments:
        var.assign(value)
    return missing, unexpected
