"""Pictures of label maps: class colours blended over the image, legends, and evaluation's comparison panels.

Prediction's overlays (`overlay_with_legend`) and evaluation's sample overlays (`comparison_panel`) paint classes
the same way (`colorize`): the class colour at OVERLAY_ALPHA over the image, ignored pixels left as the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

OVERLAY_ALPHA = 0.5  # weight of the class colour over the image


def default_palette(num_classes: int) -> np.ndarray:
    """Distinct-looking random colours (fixed seed) for classes of an unknown dataset, (K, 3) uint8."""
    return np.random.default_rng(0).integers(0, 256, (num_classes, 3)).astype(np.uint8)


def colorize(labels: np.ndarray, image: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """The palette colour of every pixel's class blended over the uint8 RGB image; pixels whose label is no class
    (255 = ignore) keep the image's colour."""
    known = labels < len(palette)
    colours = palette[np.where(known, labels, 0)].astype(np.float32)
    blended = (1 - OVERLAY_ALPHA) * image.astype(np.float32) + OVERLAY_ALPHA * colours
    return np.where(known[..., None], blended, image).round().astype(np.uint8)


def legend(classes: Sequence[int], names: Sequence[str], palette: np.ndarray, width: int) -> np.ndarray:
    """A white (h, width, 3) RGB panel listing `classes` as colour swatches with their names, wrapped into rows."""
    font, scale, thickness, row_height, pad = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1, 18, 6
    entries = []
    for c in classes:
        text_width = cv2.getTextSize(names[c], font, scale, thickness)[0][0]
        entries.append((c, min(12 + 4 + text_width + 12, width - 2 * pad)))
    rows, x = 0, pad
    positions = []
    for c, entry_width in entries:
        if x + entry_width > width - pad and x > pad:
            rows, x = rows + 1, pad
        positions.append((c, x, pad + rows * row_height))
        x += entry_width
    panel = np.full((2 * pad + (rows + 1) * row_height, width, 3), 255, np.uint8)
    for c, x, y in positions:
        cv2.rectangle(panel, (x, y + 2), (x + 11, y + 13), tuple(int(v) for v in palette[c]), -1)
        cv2.rectangle(panel, (x, y + 2), (x + 11, y + 13), (0, 0, 0), 1)
        cv2.putText(panel, names[c], (x + 16, y + 12), font, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return panel


def overlay_with_legend(image: np.ndarray, labels: np.ndarray, names: Sequence[str], palette: np.ndarray) -> np.ndarray:
    """The colour overlay above a legend of the classes present (most frequent first), uint8 RGB."""
    counts = np.bincount(labels.ravel(), minlength=len(names))
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    width = max(image.shape[1], 200)
    painted = colorize(labels, image, palette)
    painted = np.pad(painted, ((0, 0), (0, width - image.shape[1]), (0, 0)), constant_values=255)
    return np.concatenate([painted, legend(present, names, palette, width)], axis=0)


def comparison_panel(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, 3W, 3) uint8 panel: image | ground truth | prediction, each painted by `colorize`."""
    return np.concatenate([image, colorize(label, image, palette), colorize(prediction, image, palette)], axis=1)
