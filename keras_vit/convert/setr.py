"""SETR: the official (fudan-zvg/SETR, mmseg) checkpoints' keys the Keras model has no layer for.

Every SETR weight maps by name through ``core`` (layer names are the official state dict's
module paths: ``backbone.*``, ``decode_head.*``, ``auxiliary_head.N.*``). Two kinds of keys
have no counterpart, by design:

- ``<head>.conv_seg.*``: mmseg's BaseDecodeHead builds a 1x1 ``conv_seg`` (channels=512 ->
  classes) in every head; SETR's heads never call it, so it is not part of the model.
- ``auxiliary_head.*`` when the model is built without its training heads
  (``aux_heads=False``, the inference model).

This adapter drops those keys (and only those) from a SETR checkpoint, so that loading stays
strict for everything else.
"""

from keras_vit.convert.core import register_state_dict_adapter


def _is_setr(model):
    names = {layer.name for layer in model.layers}
    return "backbone.patch_embed" in names and any(n.startswith("decode_head.") for n in names)


@register_state_dict_adapter
def drop_unused_heads(model, state_dict):
    """The SETR checkpoint without its heads' unused ``conv_seg`` and, for a model without
    auxiliary heads, without ``auxiliary_head.*``; None for other models / checkpoints."""
    if not _is_setr(model):
        return None
    names = {layer.name for layer in model.layers}
    has_aux = any(n.startswith("auxiliary_head.") for n in names)

    def unused(key):
        module = key.rsplit(".", 1)[0]
        if module.endswith(".conv_seg") and module not in names:
            return True
        return key.startswith("auxiliary_head.") and not has_aux

    dropped = [k for k in state_dict if unused(k)]
    if not dropped:
        return None
    return {k: v for k, v in state_dict.items() if k not in set(dropped)}
