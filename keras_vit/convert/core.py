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

from keras_vit.layers.common import BatchNorm, LayerNorm, Linear
from keras_vit.layers.embedding import (
    MapPositionEmbedding,
    PositionEmbedding,
    PrefixTokens,
    resample_position_embedding,
    resize_grid,
)

# Buffers timm keeps in state dicts that are constants here (built from the config).
IGNORED_SUFFIXES = ("relative_position_index", "attn_mask", "num_batches_tracked")
# Keys of classifier parts a headless / features_only model does not have.
HEAD_PREFIXES = ("head.", "head_dist.", "pre_logits.", "fc_norm.", "norm.", "head.fc.")
# The Linear classifiers of every family (timm's names): what fine-tuning replaces.
CLASSIFIER_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias",
                   "head.fc.weight", "head.fc.bias")

_LAYER_CONVERTERS = {}
_STATE_DICT_ADAPTERS = []


def register_state_dict_adapter(fn):
    """Registers ``fn(model, state_dict) -> dict | None`` that renames a second checkpoint
    naming of a family (e.g. Hugging Face transformers') to the one its layers mirror.

    It returns None when it does not recognise the keys; the first adapter that returns a
    dict is used by ``load_timm_weights``, before any key is matched.
    """
    _STATE_DICT_ADAPTERS.append(fn)
    return fn


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


def _beside(path, name):
    """The key of a parameter ``name`` in the module that holds the layer at ``path``."""
    return path.rsplit(".", 1)[0] + "." + name if "." in path else name


@register_layer_converter(PrefixTokens)
def _prefix_tokens(layer, path, options):
    # timm keeps cls_token / dist_token / det_token at the model's top level.
    return [(var, _beside(path, var.name), _identity) for var in layer.tokens]


def _resize_method(options, interpolation=None, antialias=None):
    """(interpolation, antialias) for resizing a position embedding: the family's own where it
    fixes them, else load_timm_weights' (timm's checkpoint filter: bicubic with antialias)."""
    return (interpolation or options.get("interpolation", "bicubic"),
            options.get("antialias", True) if antialias is None else antialias)


def position_embedding_converter(key="pos_embed", interpolation=None, antialias=None):
    """The converter of a (1, prefix + gh*gw, D) token position embedding (``PositionEmbedding``
    and its subclasses), the one way every family loads and resizes one.

    ``key``: the reference's parameter name, beside the layer (timm's ``pos_embed``,
    TNT's ``patch_pos``). A checkpoint made for another grid is resampled as timm's
    ``resample_abs_pos_embed`` (prefix rows kept); ``interpolation`` / ``antialias``
    fix how where the reference always resizes one way, else load_timm_weights' apply.
    """

    def entries(layer, path, options):
        method, aa = _resize_method(options, interpolation, antialias)

        def convert(a):
            if a.shape == tuple(layer.pos_embed.shape) or a.ndim != 3:
                return a
            return resample_position_embedding(a, layer.grid_size, layer.num_prefix_tokens,
                                               method=method, antialias=aa)

        return [(layer.pos_embed, _beside(path, key), convert)]

    return entries


register_layer_converter(PositionEmbedding)(position_embedding_converter())


@register_layer_converter(MapPositionEmbedding)
def _map_position_embedding(layer, path, options):
    """timm's (1, C, H, W) map embedding (PiT's ``pos_embed``, TNT's ``pixel_pos``, keyed by
    the layer's own path) -> (1, H, W, C), resized as timm does when the grid differs."""
    target = tuple(layer.pos_embed.shape)

    def convert(a):
        if a.ndim != 4:
            raise ValueError(f"expected a (1, C, H, W) embedding, got {a.shape}")
        grid = np.transpose(a[0], (1, 2, 0))
        if grid.shape[:2] != target[1:3]:
            method, aa = _resize_method(options)
            grid = resize_grid(grid, target[1:3], method=method, antialias=aa)
        return grid[None].astype(np.float32)

    return [(layer.pos_embed, path, convert)]


def _sublayers(layer):
    return list(getattr(layer, "_layers", []))


def layer_entries(layer, path, options):
    """One layer's weights and its sublayers' as (variable, timm key, converter), ``path``
    being the layer's timm module path. Family converters that nest layers timm does not
    (``covers_sublayers``) call it for the sublayers with the paths timm uses."""
    conv = next((fn for cls, fn in _LAYER_CONVERTERS.items() if type(layer) is cls), None)
    if conv is not None:
        entries = list(conv(layer, path, options))
    elif type(layer).__module__.startswith("keras.") or isinstance(layer, (Linear, LayerNorm,
                                                                           BatchNorm)):
        entries = _builtin_entries(layer, path)  # keras' Dense / LayerNormalization but for call
    else:
        own = layer._trainable_variables + layer._non_trainable_variables
        entries = [(v, f"{path}.{v.name}", _identity) for v in own]
    if conv is None or not getattr(conv, "covers_sublayers", False):
        for sub in _sublayers(layer):
            entries.extend(layer_entries(sub, f"{path}.{sub.name}", options))
    return entries


def weight_entries(model, options=None):
    """Every weight of the model as (variable, timm key, converter), in a stable order."""
    return [entry for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)
            for entry in layer_entries(layer, layer.name, options or {})]


def _looks_features_only(model):
    """Every output a 4-D map, and not a dense-prediction model (whose logits are maps)."""
    from keras_vit.registry import model_task

    return all(len(t.shape) == 4 for t in model.outputs) and model_task(model) == "classification"


def _is_classifier(key, var, class_columns):
    """A classifier weight: timm's heads by name; in a segmentation or detection model, any
    weight whose output axis is the class count (main and auxiliary classifiers)."""
    return key in CLASSIFIER_KEYS or (class_columns is not None and len(var.shape) > 0
                                      and var.shape[-1] == class_columns)


def to_numpy(value):
    """A torch tensor, jax/tf array or numpy array as a float numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def load_timm_weights(model, state_dict, strict=True, interpolation="bicubic", antialias=True,
                      new_classifier=False, features_only=None):
    """Loads a timm ``state_dict()`` (Mapping[str, array]) into a keras_vit model.

    A features_only model ignores the keys of the stages and head it cut off.
    Position embeddings made for another grid are resampled as timm's
    checkpoint filter does (bicubic with antialias by default; JAX .npz
    checkpoints use bilinear without, as timm's ``_load_weights``).
    strict=True: missing keys, unexpected keys and shape mismatches raise one
    ValueError that lists them all, before any weight is assigned.
    new_classifier=True: a classifier (``CLASSIFIER_KEYS``; in segmentation models every
    weight whose output axis is the class count) of another number of classes
    than the model's is left out and the model's keeps its initialisation (timm's head
    reset for fine-tuning); everything else loads as above. Returns (missing,
    unexpected) keys.
    features_only: whether the model is a features_only cut of the checkpoint's (None:
    every output is a 4-D map and the model is not a segmentation model).
    A checkpoint in a naming a registered adapter recognises (``register_state_dict_adapter``)
    is renamed first.
    """
    state_dict = dict(state_dict)
    for nest in ("model", "state_dict", "model_ema"):
        if nest in state_dict and isinstance(state_dict[nest], dict) and len(state_dict) <= 3:
            state_dict = dict(state_dict[nest])
            break
    for adapter in _STATE_DICT_ADAPTERS:
        renamed = adapter(model, state_dict)
        if renamed is not None:
            state_dict = dict(renamed)
            break
    top_names = {layer.name for layer in model.layers}
    entries = weight_entries(model, dict(interpolation=interpolation, antialias=antialias))
    missing, mismatched, assignments, used = [], [], [], set()
    from keras_vit.registry import model_task

    task = model_task(model)
    # Segmentation and detection classifiers: every weight whose output axis is the class
    # count of the logits (main and auxiliary heads; detection's include the no-object column).
    class_columns = {"segmentation": lambda: model.outputs[0].shape[-1],
                     "detection": lambda: model.output["logits"].shape[-1]}.get(
                         task, lambda: None)()
    for var, key, convert in entries:
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        if (new_classifier and _is_classifier(key, var, class_columns)
                and np.shape(state_dict[key])[0] != var.shape[-1]):
            continue
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
    features_model = (_looks_features_only(model) if features_only is None
                      else bool(features_only))
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
