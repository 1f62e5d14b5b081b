"""Object detection with set prediction (DETR family): box utilities, the Hungarian matcher
and the set criterion, shared by DETR, Deformable DETR and YOLOS."""

import importlib
import pkgutil

from keras_vit.detection.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
)
from keras_vit.detection.losses import SetCriterion, SetPredictionModel
from keras_vit.detection.matcher import (
    hungarian_match,
    linear_sum_assignment_in_graph,
    match_cost,
)

# Every module but the shared ones is a family; importing it registers its variants.
_SHARED = ("boxes", "matcher", "losses", "data", "training", "plots", "postprocess",
           "metrics")

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _SHARED and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["SetCriterion", "SetPredictionModel", "box_area", "box_cxcywh_to_xyxy", "box_iou",
           "box_xyxy_to_cxcywh", "generalized_box_iou", "hungarian_match",
           "linear_sum_assignment_in_graph", "match_cost"]
