"""The contract of docs/DESIGN.md, checked once for every registered family.

Each case of tests/families.py (the smallest fast config of a family) is built once per
case and checked for: its output at the configured size, any other valid size (non-square
too) and a ValueError naming the valid sizes for an invalid one, a safe-mode `.keras`
round trip with identical outputs, builtin-only fp32 TFLite matching Keras, one training
step lowering the loss, a headless model's pooled features, and features_only maps
(classifiers), or NHWC logits trained with per-pixel labels (segmentation models), or
the detectors' dict of query logits and boxes trained with DETR's set criterion. A
family registered without a case fails here: add it to tests/families.py. What is special
to a family (parity with its reference, parameter counts, its quirks) stays in
tests/test_<family>.py.
"""

import re

import keras
import numpy as np
import pytest

from conftest import images
from families import (
    SMALLEST,
    build_smallest,
    classification_cases,
    registered_families,
    smallest_input,
    task_of,
)
from helpers import check_keras_round_trip, check_tflite_fp32, check_train_step_lowers_loss

CASES = sorted(set(SMALLEST) | set(registered_families()))
BATCH = 4  # one sample per class of the training check: labels 0..3


@pytest.fixture(scope="module", params=CASES)
def case(request):
    if request.param not in SMALLEST:
        pytest.fail(f"family {request.param!r} has no smallest config: add it to "
                    "tests/families.py SMALLEST")
    return request.param


@pytest.fixture(scope="module")
def model(case):
    """One model per case for the whole module: building and tracing are the costly part."""
    keras.utils.set_random_seed(0)
    return build_smallest(case)


@pytest.fixture(scope="module")
def x(case):
    return smallest_input(case, batch=BATCH)


def _size(case):
    size = SMALLEST[case][1]["img_size"]
    return (size, size) if isinstance(size, int) else tuple(size)


def _num_classes(case):
    return SMALLEST[case][1]["num_classes"]


def _check_output(case, out, batch, size):
    """Classifiers: (B, classes) logits. Segmentation models: NHWC logits at a resolution
    (their reference's: the input's, or a fixed fraction of it) no larger than the input."""
    if task_of(case) == "detection":
        logits, boxes = np.asarray(out["logits"]), np.asarray(out["pred_boxes"])
        assert logits.shape[0] == batch and logits.shape[-1] in (_num_classes(case),
                                                                  _num_classes(case) + 1)
        assert boxes.shape == (batch, logits.shape[1], 4)
        assert ((boxes >= 0) & (boxes <= 1)).all() and np.isfinite(logits).all()
        return
    out = np.asarray(out)
    if task_of(case) == "classification":
        assert out.shape == (batch, _num_classes(case))
    else:
        assert out.ndim == 4 and out.shape[0] == batch and out.shape[-1] == _num_classes(case)
        h, w = size
        assert out.shape[1] <= h and out.shape[2] <= w, out.shape
        assert h // out.shape[1] == w // out.shape[2], (out.shape, size)  # one stride
    assert np.isfinite(out).all()


def test_output_at_the_configured_size(case, model, x):
    assert model.input_shape[1:] == (*_size(case), 3)
    _check_output(case, model(x, training=False), BATCH, _size(case))


def test_invalid_size_names_valid_sizes_and_those_build(case):
    """One pixel more than the configured size is invalid for every family (all have a
    patch or network stride > 1); the error's neighbours are valid, non-square too."""
    h, w = _size(case)
    with pytest.raises(ValueError, match=r"valid neighbours: \d+ or \d+") as error:
        build_smallest(case, img_size=h + 1)
    below, above = (int(n) for n in re.search(r"valid neighbours: (\d+) or (\d+)",
                                              str(error.value)).groups())
    assert below <= h < above
    model = build_smallest(case, img_size=(above, w))
    assert model.input_shape[1:3] == (above, w)
    _check_output(case, model(images(1, (above, w))), 1, (above, w))


def test_keras_round_trip_in_safe_mode(model, x, tmp_path):
    check_keras_round_trip(model, x, tmp_path)


def test_tflite_builtin_ops_match_keras(model, tmp_path):
    check_tflite_fp32(model, tmp_path)


@pytest.mark.parametrize("classifier", classification_cases())
def test_headless_model_returns_pooled_features(classifier):
    case = classifier
    features = build_smallest(case, num_classes=0)(smallest_input(case))
    assert len(features.shape) == 2 and features.shape[0] == 2


@pytest.mark.parametrize("classifier", classification_cases())
def test_features_only_returns_maps_and_checks_out_indices(classifier):
    case = classifier
    model = build_smallest(case, features_only=True, out_indices=(0,))  # smallest: 1 block
    h, w = _size(case)
    maps = model(smallest_input(case))
    maps = maps if isinstance(maps, (list, tuple)) else [maps]
    for fmap in maps:  # NHWC maps, smaller than the input
        assert len(fmap.shape) == 4 and fmap.shape[0] == 2, fmap.shape
        assert fmap.shape[1] < h and fmap.shape[2] < w, fmap.shape
    with pytest.raises(ValueError, match="out index"):
        build_smallest(case, features_only=True, out_indices=(99,))


# Last: it changes the module's model's weights.
def test_one_training_step_lowers_the_loss(case, model, x):
    # lr 1e-4: at 1e-3 the step overshoots on BoTNet's BatchNorm-heavy stages.
    if task_of(case) == "detection":
        _check_detection_train_step(case, model, x)
        return
    if task_of(case) == "classification":
        labels = np.arange(BATCH)
    else:  # random per-pixel labels of the logits' size
        h, w = model.output_shape[1:3]
        labels = np.random.default_rng(0).integers(0, _num_classes(case), (BATCH, h, w))
    check_train_step_lowers_loss(model, x, labels, lr=1e-4)


def _check_detection_train_step(case, model, x):
    """One AdamW step on the set criterion (focal for sigmoid detectors, whose logits have
    no no-object column) lowers it on random targets: 0-3 boxes per image."""
    from keras_vit.detection import SetCriterion, SetPredictionModel

    classes = _num_classes(case)
    focal = model.output["logits"].shape[-1] == classes
    rng = np.random.default_rng(0)
    target_classes = np.full((BATCH, 3), -1, np.int32)
    target_boxes = np.zeros((BATCH, 3, 4), np.float32)
    for image, count in enumerate([1, 2, 0, 3]):
        target_classes[image, :count] = rng.integers(0, classes, count)
        target_boxes[image, :count] = rng.uniform(0.2, 0.5, (count, 4))
    y = {"classes": target_classes, "boxes": target_boxes}
    trainer = SetPredictionModel(model, SetCriterion(classes, focal=focal))
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-4, weight_decay=0.05), run_eagerly=True)
    before = float(trainer.evaluate(x, y, verbose=0, batch_size=BATCH))
    trainer.train_on_batch(x, y)
    after = float(trainer.evaluate(x, y, verbose=0, batch_size=BATCH))
    assert after < before, (before, after)
