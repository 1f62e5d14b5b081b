"""The embedded dataset: procedurally generated images of geometric shapes, no download.

Deterministic for a seed: image i of a split depends only on (seed, split, i).
Each image has a textured, noisy background and one or more shapes, each of a
random class, colour, size, position and rotation. Samples carry the boxes,
classes and instance masks of all their shapes and a semantic mask, so the
detection and segmentation tasks use the same generator. Classification uses
one shape per image; its label is that shape's class. Shapes differ in form
only: colours are drawn independently of the class.
"""

import functools
import zlib

import numpy as np

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond")
SPLITS = ("train", "validation", "test")


def _split_seed(seed, split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [int(seed), zlib.crc32(split.encode())]


def _polygon_inside(px, py, vertices):
    """Even-odd rule point-in-polygon on a grid of points (vectorised over pixels)."""
    inside = np.zeros(px.shape, bool)
    n = len(vertices)
    for i in range(n):
        x0, y0 = vertices[i]
        x1, y1 = vertices[(i + 1) % n]
        crosses = (y0 > py) != (y1 > py)
        x_at = (x1 - x0) * (py - y0) / (y1 - y0 + 1e-12) + x0
        inside ^= crosses & (px < x_at)
    return inside


def _regular(n, r, angle, inner=None):
    """Vertices of a regular n-gon (or a star when ``inner`` gives the inner radius)."""
    if inner is None:
        t = angle + 2 * np.pi * np.arange(n) / n
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    t = angle + np.pi * np.arange(2 * n) / n
    radii = np.where(np.arange(2 * n) % 2 == 0, r, inner)
    return np.stack([radii * np.cos(t), radii * np.sin(t)], 1)


@functools.lru_cache(maxsize=8)
def _pixel_grid(size):
    """Pixel-centre coordinates (yy, xx), and the same on the 0-1 scale; built once per size."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy + 0.5, xx + 0.5, yy / size, xx / size


def shape_mask(cls, size, cx, cy, r, angle):
    """Boolean (size, size) mask of one shape of class ``cls`` centred at (cx, cy), radius r."""
    yy, xx = _pixel_grid(size)[:2]
    dx, dy = xx - cx, yy - cy
    name = CLASS_NAMES[cls]
    if name == "circle":
        return dx * dx + dy * dy <= r * r
    if name == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    # rotate the pixel offsets into the shape's frame
    c, s = np.cos(-angle), np.sin(-angle)
    u, v = c * dx - s * dy, s * dx + c * dy
    if name == "square":
        h = r / np.sqrt(2)
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if name == "diamond":
        return np.abs(u) / r + np.abs(v) / (0.6 * r) <= 1
    if name == "cross":
        w = 0.3 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    sides = {"triangle": (3, None), "hexagon": (6, None), "star": (5, 0.45 * r)}[name]
    verts = _regular(sides[0], r, -np.pi / 2, sides[1])
    return _polygon_inside(u, v, verts)


def _background(rng, size):
    """A smooth colour gradient with a random stripe texture and pixel noise."""
    yy, xx = _pixel_grid(size)[2:]
    base = rng.uniform(0, 255, 3).astype(np.float32)
    slope = rng.uniform(-30, 30, (2, 3)).astype(np.float32)
    freq, phase, theta = rng.uniform(2, 8), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    stripes = np.sin(np.float32(2 * np.pi * freq) * (xx * np.float32(np.cos(theta)) +
                                                       yy * np.float32(np.sin(theta))) +
                     np.float32(phase)) * np.float32(rng.uniform(0, 8))
    img = rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(3.0)
    img += base
    img += (xx[..., None] * slope[0] + yy[..., None] * slope[1] + stripes[..., None])
    return img


def _contrasting_colour(rng, background_mean):
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.abs(colour - background_mean).sum() > 150:
            return colour
    return 255.0 - background_mean


def generate(num, img_size, seed=0, split="train", min_shapes=1, max_shapes=1, classes=None):
    """Generates ``num`` samples. Returns a dict:

    images (N, S, S, 3) uint8; labels (N,) int32 (class of the first shape);
    boxes: list of (k, 4) float32 [x0, y0, x1, y1] pixel boxes; classes: list of
    (k,) int32; instance_masks: list of (k, S, S) bool; semantic_masks (N, S, S)
    uint8 (0 = background, class + 1 elsewhere, later shapes on top).
    Classification labels are balanced: sample i has class i mod num_classes,
    shuffled with the seed.
    """
    if img_size < 16:
        raise ValueError(f"shapes need img_size >= 16, got {img_size}")
    if not 1 <= min_shapes <= max_shapes:
        raise ValueError("need 1 <= min_shapes <= max_shapes")
    classes = list(range(len(CLASS_NAMES))) if classes is None else list(classes)
    rng = np.random.default_rng(_split_seed(seed, split))
    first = np.array([classes[i % len(classes)] for i in range(num)])
    rng.shuffle(first)
    size = int(img_size)
    out = dict(images=np.zeros((num, size, size, 3), np.uint8), labels=first.astype(np.int32),
               boxes=[], classes=[], instance_masks=[],
               semantic_masks=np.zeros((num, size, size), np.uint8))
    for i in range(num):
        img = _background(rng, size)
        k = int(rng.integers(min_shapes, max_shapes + 1))
        scale = 1.0 if k == 1 else 0.6
        boxes, cls_list, masks = [], [], []
        for j in range(k):
            cls = int(first[i]) if j == 0 else int(rng.choice(classes))
            r = rng.uniform(0.28, 0.42) * size * scale
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            mask = shape_mask(cls, size, cx, cy, r, rng.uniform(0, 2 * np.pi))
            if not mask.any():
                continue
            img[mask] = _contrasting_colour(rng, img.mean((0, 1)))
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            cls_list.append(cls)
            masks.append(mask)
            out["semantic_masks"][i][mask] = cls + 1
        # Later shapes may cover earlier ones: instance masks keep only what is visible.
        for j in range(len(masks)):
            for later in masks[j + 1:]:
                masks[j] = masks[j] & ~later
        out["images"][i] = np.clip(img, 0, 255).astype(np.uint8)
        out["boxes"].append(np.asarray(boxes, np.float32).reshape(-1, 4))
        out["classes"].append(np.asarray(cls_list, np.int32))
        out["instance_masks"].append(np.stack(masks) if masks else np.zeros((0, size, size), bool))
    return out
