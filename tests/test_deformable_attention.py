"""Multi-scale deformable attention (keras_vit.layers.deformable_attention): the flat-gather
bilinear sampling against a direct numpy grid_sample (bilinear, zero padding,
align_corners=False) and against transformers' pure-PyTorch ``MultiScaleDeformableAttention``
(stored in tests/fixtures/deformable_detr/msda_core.npz by tools/fixtures/deformable_detr.py),
the whole layer against transformers' ``DeformableDetrMultiscaleDeformableAttention`` with 2-
and 4-coordinate reference points, the reference's initialisation and builtin-only TFLite."""

import os

import numpy as np
import keras
import pytest

from keras_vit.layers import MultiScaleDeformableAttention
from keras_vit.layers.deformable_attention import deformable_sampling

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "deformable_detr")
SHAPES = ((6, 5), (3, 3), (2, 1))


def grid_sample_numpy(image, gx, gy):
    """torch.nn.functional.grid_sample(image[None], grid, bilinear, zeros, align_corners=False)
    written out: image (C, H, W), grid coordinates gx, gy in [-1, 1] of any shape -> (..., C)."""
    c, h, w = image.shape
    x = ((gx + 1) * w - 1) / 2
    y = ((gy + 1) * h - 1) / 2
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    out = np.zeros(gx.shape + (c,))
    for xi, yi, wgt in ((x0, y0, (x0 + 1 - x) * (y0 + 1 - y)), (x0 + 1, y0, (x - x0) * (y0 + 1 - y)),
                        (x0, y0 + 1, (x0 + 1 - x) * (y - y0)), (x0 + 1, y0 + 1, (x - x0) * (y - y0))):
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        pix = image[:, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]  # (C, ...)
        out += np.moveaxis(pix, 0, -1) * (wgt * ok)[..., None]
    return out


def msda_numpy(value, shapes, locations, weights):
    """The reference's per-level grid_sample formulation: value (B, S, heads, d), locations
    (B, Q, heads, levels, points, 2) in [0, 1], weights (B, Q, heads, levels, points)."""
    b, _, heads, d = value.shape
    q = locations.shape[1]
    out = np.zeros((b, q, heads, d))
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        level = value[:, start:start + h * w].reshape(b, h, w, heads, d)
        start += h * w
        for i in range(b):
            for hd in range(heads):
                img = np.transpose(level[i, :, :, hd], (2, 0, 1))
                grid = 2 * locations[i, :, hd, lvl] - 1  # (Q, points, 2)
                s = grid_sample_numpy(img, grid[..., 0], grid[..., 1])  # (Q, points, d)
                out[i, :, hd] += np.einsum("qp,qpd->qd", weights[i, :, hd, lvl], s)
    return out.reshape(b, q, heads * d)


def random_case(seed, batch=2, queries=7, heads=2, points=3, head_dim=4):
    rng = np.random.default_rng(seed)
    seq = sum(h * w for h, w in SHAPES)
    value = rng.standard_normal((batch, seq, heads, head_dim)).astype(np.float32)
    # Locations from well outside to well inside (zero padding and every border case).
    loc = rng.uniform(-0.3, 1.3, (batch, queries, heads, len(SHAPES), points, 2)).astype(np.float32)
    loc[0, 0, 0, 0, 0] = (0.0, 1.0)  # exactly on the map's edges
    loc[0, 1, 0, 0, 0] = (0.5 / 5, 0.5 / 6)  # exactly on a pixel centre
    wts = rng.random((batch, queries, heads, len(SHAPES), points)).astype(np.float32)
    return value, loc, wts


def run_sampling(value, loc, wts):
    b, q, heads, levels, points, _ = loc.shape
    flat = (b, q, heads * levels * points)
    out = deformable_sampling(keras.ops.convert_to_tensor(value.reshape(b, value.shape[1], -1)),
                              loc[..., 0].reshape(flat), loc[..., 1].reshape(flat),
                              wts.reshape(flat), SHAPES, heads, points)
    return keras.ops.convert_to_numpy(out)


def test_sampling_matches_numpy_grid_sample():
    value, loc, wts = random_case(0)
    np.testing.assert_allclose(run_sampling(value, loc, wts), msda_numpy(value, SHAPES, loc, wts),
                               atol=1e-5)


def test_sampling_matches_transformers_pytorch():
    ref = np.load(os.path.join(FIXTURES, "msda_core.npz"))
    shapes = tuple(map(tuple, ref["spatial_shapes"]))
    value, loc, wts = ref["value"], ref["sampling_locations"], ref["attention_weights"]
    b, q, heads, levels, points, _ = loc.shape
    flat = (b, q, heads * levels * points)
    out = deformable_sampling(keras.ops.convert_to_tensor(value.reshape(b, value.shape[1], -1)),
                              loc[..., 0].reshape(flat), loc[..., 1].reshape(flat),
                              wts.reshape(flat), shapes, heads, points)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), ref["output"], atol=1e-5)
    np.testing.assert_allclose(msda_numpy(value, shapes, loc, wts), ref["output"], atol=1e-5)


def _layer_from_fixture(ref):
    shapes = tuple(map(tuple, ref["spatial_shapes"]))
    layer = MultiScaleDeformableAttention(int(ref["dim"]), shapes, int(ref["num_heads"]),
                                          int(ref["num_points"]))
    layer(ref["query"], ref["reference_points_2"], ref["value"], ref["value_mask"])
    for sub in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
        getattr(layer, sub).set_weights([ref[f"{sub}.weight"].T, ref[f"{sub}.bias"]])
    return layer


@pytest.mark.parametrize("coords", [2, 4])
def test_layer_matches_transformers(coords):
    ref = np.load(os.path.join(FIXTURES, "msda_layer.npz"))
    layer = _layer_from_fixture(ref)
    out = layer(ref["query"], ref[f"reference_points_{coords}"], ref["value"], ref["value_mask"])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), ref[f"output_{coords}"], atol=1e-5)


def test_initialisation_is_the_reference_ring():
    layer = MultiScaleDeformableAttention(16, SHAPES, num_heads=4, num_points=2)
    layer(np.zeros((1, 3, 16), np.float32), np.full((1, 3, 3, 2), 0.5, np.float32),
          np.zeros((1, 41, 16), np.float32))
    bias = keras.ops.convert_to_numpy(layer.sampling_offsets.bias).reshape(4, 3, 2, 2)
    # Head h points along angle 2 pi h / heads, scaled to the unit square, point p at p + 1.
    np.testing.assert_allclose(bias[0, :, 0], [[1, 0]] * 3, atol=1e-6)
    np.testing.assert_allclose(bias[1, 1, 1], [0, 2], atol=1e-6)
    np.testing.assert_allclose(bias[2, 2, 1], [-2, 0], atol=1e-6)
    assert not np.any(keras.ops.convert_to_numpy(layer.attention_weights.kernel))


def test_layer_exports_builtin_tflite(tmp_path):
    from keras_vit.export import export_tflite

    ref = np.load(os.path.join(FIXTURES, "msda_layer.npz"))
    layer = _layer_from_fixture(ref)
    q = keras.Input(ref["query"].shape[1:], name="query")
    r = keras.Input(ref["reference_points_4"].shape[1:], name="reference_points")
    v = keras.Input(ref["value"].shape[1:], name="value")
    m = keras.Input(ref["value_mask"].shape[1:], name="value_mask")
    model = keras.Model([q, r, v, m], layer(q, r, v, m))
    inputs = [ref["query"], ref["reference_points_4"], ref["value"], ref["value_mask"]]
    report = export_tflite(model, str(tmp_path / "msda.tflite"), representative_data=[inputs])
    assert report["outputs"]
