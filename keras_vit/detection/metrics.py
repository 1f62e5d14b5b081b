"""COCO mAP (AP, AP50, AP75, AP small/medium/large) with pycocotools, from padded targets and
post-processed detections of any dataset (shapes, COCO-format folders)."""

import contextlib
import io

import numpy as np

METRIC_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


class CocoEvaluator:
    """Accumulates images: ``add(gt_boxes, gt_classes, boxes, scores, classes)`` with boxes in
    xyxy pixels (targets padded with class -1), then ``result()`` -> dict of METRIC_NAMES."""

    def __init__(self, num_classes):
        self.num_classes = int(num_classes)
        self.images, self.annotations, self.detections = [], [], []

    def add(self, gt_boxes, gt_classes, boxes, scores, classes, image_size=(0, 0)):
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": int(image_size[0]),
                            "width": int(image_size[1])})
        for box, cls in zip(np.asarray(gt_boxes, np.float64), np.asarray(gt_classes)):
            if cls < 0:
                continue
            w, h = box[2] - box[0], box[3] - box[1]
            self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id,
                                     "category_id": int(cls), "iscrowd": 0, "area": w * h,
                                     "bbox": [box[0], box[1], w, h]})
        for box, score, cls in zip(np.asarray(boxes, np.float64), np.asarray(scores),
                                   np.asarray(classes)):
            self.detections.append({"image_id": image_id, "category_id": int(cls),
                                    "score": float(score),
                                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})

    def result(self):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        if not self.annotations:
            raise ValueError("no ground-truth boxes to evaluate against")
        gt = COCO()
        gt.dataset = {"images": self.images, "annotations": self.annotations,
                      "categories": [{"id": i} for i in range(self.num_classes)]}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            dt = gt.loadRes(self.detections) if self.detections else COCO()
            evaluation = COCOeval(gt, dt, "bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        # pycocotools gives -1 where a size range has no boxes.
        return {name: (float(v) if v >= 0 else None)
                for name, v in zip(METRIC_NAMES, evaluation.stats[:6])}
