"""CMT: the official state dict's top-level ``relative_pos_<stage>`` tables.

Every other CMT weight maps by name through ``core`` (Keras layer names are
the official module paths). The relative position bias is a model-level
parameter in the official code (one per stage, shared by its blocks); here a
``CMTRelativePosition`` layer named ``relative_pos_<stage>`` holds it, so its
key is the layer's path itself. Its shape (heads, queries, keys) is tied to
the input size; the official code does not resample it, so a checkpoint made
at another size is a clear error rather than a silent reinterpretation.
"""

from keras_vit.convert.core import register_layer_converter
from keras_vit.models.cmt import CMTRelativePosition


@register_layer_converter(CMTRelativePosition)
def _relative_position(layer, path, options):
    want = tuple(layer.relative_pos.shape)

    def convert(a):
        if a.shape != want:
            raise ValueError(
                f"checkpoint table {tuple(a.shape)} does not fit the model's {want} "
                f"(heads, queries, keys): CMT's relative position bias is tied to the input "
                f"size, so build the model at the img_size the checkpoint was trained at")
        return a

    return [(layer.relative_pos, path, convert)]
