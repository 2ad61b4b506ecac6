"""Built-in demo data: procedurally generated scenes that need no download.

Each scene is a textured background with 3 to 7 overlapping shapes (ellipses, rotated rectangles, triangles,
irregular blobs) whose radii range from 8% to 35% of the image side; later shapes occlude earlier ones. Every
class has its own colour family and texture (stripes, checks, dots, speckle, rings), so a pixel's class is
decidable from its neighbourhood, not only from the outline. Per-shape colour jitter, random texture frequency,
orientation and phase, a per-image gain and offset, and Gaussian pixel noise keep it from being trivial.

Example `index` of split `split` is a pure function of (split seed, index): the same on every machine and run, with
separate seeds for train and val. Images are uint8 RGB, labels uint8 class indices (no ignore pixels).
"""

import cv2
import numpy as np

CLASSES = ("background", "stripes", "checks", "dots", "speckle", "rings")
PALETTE = ((0, 0, 0), (220, 60, 50), (60, 90, 220), (60, 180, 80), (230, 200, 60), (170, 70, 190))
IMAGE_SIZE = 128
NUM_EXAMPLES = {"train": 2000, "val": 100}
_SPLIT_SEEDS = {"train": 20240611, "val": 7001}

# Mean RGB colour of each class before jitter and texture; neighbours in hue differ in texture.
_BASE_COLOURS = np.array(
    [(115, 110, 100), (185, 75, 60), (70, 95, 185), (75, 155, 85), (195, 175, 75), (155, 85, 165)], np.float32
)


def num_examples(split: str) -> int:
    """Number of examples of a demo split ('train' or 'val')."""
    if split not in NUM_EXAMPLES:
        raise KeyError(f"demo has no split {split!r}: choose one of {', '.join(NUM_EXAMPLES)}")
    return NUM_EXAMPLES[split]


def _shape_polygon(rng: np.random.Generator, size: int) -> np.ndarray:
    """Vertices (N, 2) int32 of a random ellipse, rotated rectangle, triangle or blob inside a size x size image."""
    centre = rng.uniform(0.1 * size, 0.9 * size, 2)
    radius = size * rng.uniform(0.08, 0.35)
    angle = rng.uniform(0.0, 2 * np.pi)
    kind = rng.integers(4)
    if kind == 0:  # ellipse
        theta = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
        radii = radius * np.array([1.0, rng.uniform(0.45, 1.0)])[:, None] * np.ones_like(theta)
        local = np.stack([radii[0] * np.cos(theta), radii[1] * np.sin(theta)], axis=1)
    elif kind == 1:  # rectangle
        half = radius * np.array([1.0, rng.uniform(0.4, 1.0)])
        local = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * half
    elif kind == 2:  # triangle
        theta = np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
        local = radius * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    else:  # blob: star-shaped polygon with jittered radii
        theta = np.linspace(0.0, 2 * np.pi, int(rng.integers(7, 11)), endpoint=False)
        radii = radius * rng.uniform(0.55, 1.0, theta.shape)
        local = np.stack([radii * np.cos(theta), radii * np.sin(theta)], axis=1)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.round(local @ rotation.T + centre).astype(np.int32)


def _pattern(class_index: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Texture of one class instance: a (H, W) float32 luminance modulation roughly in [-1, 1]."""
    angle = rng.uniform(0.0, np.pi)
    period = rng.uniform(5.0, 9.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    if class_index == 0:  # background: two slow waves (blotches)
        across = -xx * np.sin(angle) + yy * np.cos(angle)
        return 0.5 * np.sin(along / rng.uniform(12, 24) + phase) * np.cos(across / rng.uniform(12, 24))
    if class_index == 1:  # stripes
        return np.sin(2 * np.pi * along / period + phase)
    if class_index == 2:  # checks
        across = -xx * np.sin(angle) + yy * np.cos(angle)
        return np.sign(np.sin(np.pi * along / (0.6 * period) + phase) * np.sin(np.pi * across / (0.6 * period)))
    if class_index == 3:  # dots on a lattice
        offset = rng.uniform(0.0, period, 2)
        dy = np.mod(yy + offset[0], period) - period / 2
        dx = np.mod(xx + offset[1], period) - period / 2
        return np.where(dy * dy + dx * dx < (0.3 * period) ** 2, 1.0, -0.4)
    if class_index == 4:  # speckle
        return rng.standard_normal(yy.shape).astype(np.float32) * 0.7
    centre = rng.uniform(0.0, yy.shape[0], 2)  # rings
    return np.sin(2 * np.pi * np.hypot(yy - centre[0], xx - centre[1]) / period + phase)


def _texture(class_index: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Full-image RGB float32 texture of one class instance (base colour + jitter + pattern)."""
    colour = _BASE_COLOURS[class_index] + rng.uniform(-22.0, 22.0, 3).astype(np.float32)
    amplitude = rng.uniform(30.0, 50.0)
    return colour + amplitude * _pattern(class_index, rng, yy, xx)[..., None].astype(np.float32)


def generate(split: str, index: int, size: int = IMAGE_SIZE) -> dict[str, np.ndarray | str]:
    """Returns demo example `index` of `split`: dict(image=uint8 (size,size,3) RGB, label=uint8 (size,size), name)."""
    rng = np.random.default_rng([_SPLIT_SEEDS[split], index % num_examples(split)])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    num_shapes = int(rng.integers(3, 8))
    shape_classes = rng.integers(1, len(CLASSES), num_shapes)
    instances = np.zeros((size, size), np.uint8)
    for instance in range(1, num_shapes + 1):
        cv2.fillPoly(instances, [_shape_polygon(rng, size)], instance)
    label = np.concatenate([[0], shape_classes]).astype(np.uint8)[instances]
    image = _texture(0, rng, yy, xx)
    for instance, class_index in enumerate(shape_classes, start=1):
        mask = instances == instance
        if mask.any():
            image[mask] = _texture(int(class_index), rng, yy, xx)[mask]
    image = image * rng.uniform(0.85, 1.15) + rng.uniform(-12.0, 12.0)
    image = image + rng.normal(0.0, 6.0, image.shape)
    return {
        "image": np.clip(np.round(image), 0, 255).astype(np.uint8),
        "label": label,
        "name": f"demo_{split}_{index:05d}",
    }
