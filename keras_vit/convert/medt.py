"""Medical Transformer (jeya-maria-jose/Medical-Transformer): the axial attention's tensors.

Every other weight maps by name through ``core`` (Keras layer names are the official module
paths). ``UnusedConv`` (official 1x1 convs never called) holds its kernel in Keras'
layout. An ``AxialAttention`` layer holds the official ``qkv_transform`` (a 1x1 Conv1d,
(2 dim, in, 1)) as an (in, 2 dim) matrix, the relative table ``relative`` (2 group_dim,
2 kernel_size - 1) in the official layout and the gates ``f_qr``, ``f_kr``, ``f_sve``,
``f_sv``; its BatchNorms are sublayers named as the official ones. The table is tied to
the input size (kernel_size is the attended axis' length); the official code does not
resample it, so a checkpoint made at another size is a clear error.

Official checkpoints also hold the ``flatten_index`` buffers (constants of the size here)
and, when trained with ``nn.DataParallel`` as ``train.py`` does on several GPUs, a
``module.`` prefix on every key: the state-dict adapter drops the first and strips the
second.
"""

import numpy as np

from keras_vit.convert.core import register_layer_converter, register_state_dict_adapter
from keras_vit.segmentation.medt import AxialAttention, UnusedConv


@register_layer_converter(AxialAttention)
def _axial_attention(layer, path, options):
    def qkv(a):
        if a.ndim == 3:
            a = a[:, :, 0]  # (out, in, 1) Conv1d
        return np.transpose(a)

    def relative(a):
        want = tuple(layer.relative.shape)
        if a.shape != want:
            raise ValueError(
                f"checkpoint table {tuple(a.shape)} does not fit the model's {want} "
                f"(2 group_dim, 2 kernel_size - 1): MedT's relative embeddings are tied to the "
                f"input size, so build the model at the img_size the checkpoint was trained at")
        return a

    entries = [(layer.qkv, f"{path}.qkv_transform.weight", qkv)]
    if layer.positional:
        entries.append((layer.relative, f"{path}.relative", relative))
        # 0-d in the official state dict; (1,) where a writer promoted scalars.
        entries.extend((var, f"{path}.{gate}", lambda a: a.reshape(()) if a.size == 1 else a)
                       for gate, var in layer.gates.items())
    return entries


@register_layer_converter(UnusedConv)
def _unused_conv(layer, path, options):
    # torch's (out, in, 1, 1) -> Keras' (1, 1, in, out), as the built-in Conv2D's.
    return [(layer.kernel, f"{path}.weight", lambda a: np.transpose(a, (2, 3, 1, 0))),
            (layer.bias, f"{path}.bias", lambda a: a)]


def _is_medt(model):
    return any(isinstance(layer, AxialAttention) for layer in model.layers)


@register_state_dict_adapter
def _official_buffers(model, state_dict):
    """The official state dict without its ``flatten_index`` buffers and ``module.`` prefix."""
    if not _is_medt(model):
        return None
    keys = list(state_dict)
    prefixed = bool(keys) and all(k.startswith("module.") for k in keys)
    if not prefixed and not any(k.endswith(".flatten_index") for k in keys):
        return None
    renamed = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if prefixed else key
        if not key.endswith(".flatten_index"):
            renamed[key] = value
    return renamed
