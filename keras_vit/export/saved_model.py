"""TensorFlow SavedModel export with an ``images`` serving signature."""

import keras
import tensorflow as tf

from keras_vit.export.atomic import atomic_path


def input_specs(model, batch_size=None):
    """One TensorSpec per model input, named as the Keras inputs."""
    return [tf.TensorSpec((batch_size,) + tuple(t.shape[1:]), t.dtype, name=t.name.split(":")[0])
            for t in model.inputs]


def call_on_inputs(model, arrays):
    """``model`` in inference on ``arrays``, one per input in ``model.inputs`` order, packed
    as the model takes its inputs (a tensor, a list, or a dict by name)."""
    return model(keras.tree.pack_sequence_as(model.input, list(arrays)), training=False)


def export_saved_model(model, path, batch_size=None):
    """Writes ``model`` as a SavedModel at ``path`` (atomically; an existing export survives a
    failure). Signatures ``serve`` and ``serving_default`` take the model's inputs (images,
    NHWC float32) with the given (or unknown) batch size. Returns ``path``."""
    specs = input_specs(model, batch_size)
    with atomic_path(path, directory=True) as tmp:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", lambda *xs: call_on_inputs(model, xs),
                             input_signature=specs)
        archive.write_out(tmp, verbose=False)
    return path
