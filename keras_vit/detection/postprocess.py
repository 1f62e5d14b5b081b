"""From a detector's query outputs to scored boxes in input pixels (keras.ops, static shapes,
so the same function runs in Keras, in a SavedModel and inside a TFLite graph).

DETR / YOLOS (softmax with a no-object class, DETR's PostProcess): each query's best real
class and its probability; the ``top_k`` highest-scoring queries. Deformable DETR (sigmoid
scores): the ``top_k`` highest (query, class) pairs over all queries and classes, as its
PostProcess does.
"""

from keras import ops

from keras_vit.detection.boxes import box_cxcywh_to_xyxy


def postprocess(outputs, image_size, top_k=100, sigmoid=False):
    """{"scores": (B, k), "classes": (B, k) int32, "boxes": (B, k, 4) xyxy pixels}.

    ``image_size``: (h, w) of the input the normalised boxes refer to. ``sigmoid``: True for
    Deformable DETR's independent class scores (no no-object column), False for softmax
    with a no-object class (DETR, YOLOS)."""
    logits, boxes = outputs["logits"], outputs["pred_boxes"]
    num_queries, columns = logits.shape[1], logits.shape[2]
    h, w = image_size
    scale = ops.convert_to_tensor([w, h, w, h], "float32")
    # Scaled to pixels before the corners: an int8 file gives the corners (a PACK) the
    # scale of its output, and in pixels the normalised values would get 1/255 of the image
    # size as their quantization step (a 6.5 px step at 32 px, measured).
    xyxy = box_cxcywh_to_xyxy(ops.cast(boxes, "float32") * scale)
    if sigmoid:
        k = min(top_k, num_queries * columns)
        flat = ops.reshape(ops.sigmoid(ops.cast(logits, "float32")), (-1, num_queries * columns))
        scores, index = ops.top_k(flat, k)
        query = index // columns
        classes = index % columns
    else:
        k = min(top_k, num_queries)
        prob = ops.softmax(ops.cast(logits, "float32"), axis=-1)[..., :-1]
        # top_k of 1 as the argmax: Keras' TF argmax emits BitwiseAnd, not a TFLite builtin
        best, best_class = ops.top_k(prob, 1)
        scores, query = ops.top_k(best[..., 0], k)
        classes = ops.take_along_axis(best_class[..., 0], query, axis=1)
    picked = ops.take_along_axis(xyxy, ops.expand_dims(query, -1), axis=1)
    return {"scores": scores, "classes": ops.cast(classes, "int32"), "boxes": picked}
