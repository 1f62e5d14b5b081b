"""Swin-UNet: the official checkpoints' wrapper prefixes, and its ImageNet Swin initialisation.

Swin-UNet's layers are named as the official ``SwinTransformerSys`` modules, and the Swin
blocks' tables load through ``keras_vit.convert.swin``. Two things need more:
- the official training script saves its ``SwinUnet`` wrapper (``swin_unet.`` before every
  key), under ``nn.DataParallel`` with ``module.`` before that: a registered state-dict
  adapter strips either, so ``load_timm_weights`` / ``create_model(pretrained=PATH)`` load
  both namings (and the bare ``SwinTransformerSys`` one) strictly;
- the official training starts from an ImageNet Swin-T checkpoint (``SwinUnet.load_from``):
  ``swin_encoder_init`` does what it does.
"""

import re

import numpy as np

from keras_vit.convert.core import register_state_dict_adapter, to_numpy, weight_entries

# Longest first: DataParallel around the SwinUnet wrapper, the wrapper alone.
WRAPPER_PREFIXES = ("module.swin_unet.", "swin_unet.")


def is_swin_unet(model):
    names = {layer.name for layer in model.layers}
    return "norm_up" in names and "layers_up.0" in names


@register_state_dict_adapter
def strip_wrapper_prefix(model, state_dict):
    """A ``SwinUnet`` wrapper's state dict -> ``SwinTransformerSys`` keys (None when the keys
    have no wrapper prefix or the model is not a Swin-UNet)."""
    if not state_dict or not is_swin_unet(model):
        return None
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return None


def swin_encoder_init(model, state_dict):
    """Initialises a Swin-UNet from an ImageNet Swin checkpoint in the original Microsoft
    layout (``swin_tiny_patch4_window7_224.pth``, keys under ``model``), as the official
    ``SwinUnet.load_from``: every encoder stage's weights ``layers.i.*`` also go to the
    mirrored decoder stage ``layers_up.{3-i}.*``; then every key the model has with the
    same shape is loaded, the rest skipped (the official loads with strict=False: the
    classifier, Swin-T's extra stage-3 blocks, and whatever has another shape; the patch
    expanding, ``concat_back_dim``, ``norm_up``, ``up`` and ``output`` keep their
    initialisation). As the official, the mirror index is 3 - i (four stages).

    Returns (loaded, not_loaded): the model's keys that got a checkpoint weight, and those
    that kept theirs.
    """
    state_dict = dict(state_dict)
    if isinstance(state_dict.get("model"), dict):
        state_dict = dict(state_dict["model"])
    full = dict(state_dict)
    for key, value in state_dict.items():
        match = re.match(r"layers\.(\d)(\..*)", key)  # the official's k[7:8]: one digit
        if match:
            full[f"layers_up.{3 - int(match.group(1))}{match.group(2)}"] = value
    loaded, not_loaded = [], []
    for var, key, convert in weight_entries(model):
        if key not in full:
            not_loaded.append(key)
            continue
        raw = to_numpy(full[key]).astype(np.float32)
        try:
            value = convert(raw)
        except ValueError:
            value = None
        # Another shape before or after the layout change: the official deletes the key
        # (a relative position table of another window is not resized there).
        same = value is not None and tuple(value.shape) == tuple(var.shape)
        if key.endswith("relative_position_bias_table"):
            same = same and tuple(raw.shape) == tuple(var.shape)
        if not same:
            not_loaded.append(key)
            continue
        var.assign(value)
        loaded.append(key)
    return loaded, not_loaded
