"""Decoding and validation of one image/label pair, shared by the pipelines and the data check.

Images decode like MMSegmentation's `LoadImageFromFile` (OpenCV, colour flag): grey images are replicated to three
channels, an alpha channel is dropped, 16-bit images are scaled to 8 bits; the result is returned as RGB. Anything
OpenCV cannot decode, and JPEG/PNG files cut short (no end marker: OpenCV would silently fill the rest with grey),
are bad examples. (Data errors inside a complete JPEG stream that libjpeg conceals cannot be seen here.)

Labels decode like MMSegmentation's `LoadAnnotations` (Pillow, unchanged): 8-bit greyscale ('L') and palette ('P')
PNGs are accepted and their stored values are the class indices (for 'P' the palette only colours them, as in VOC
and iSAID). Labels that are 16-bit ('I;16', 'I'), colour ('RGB', 'RGBA', 'LA') or 1-bit are bad: MMSegmentation
would truncate or mis-read them silently. After `reduce_zero_label` (0 -> 255, k -> k-1), every value must be a
class index or the ignore index 255, and the label must have the image's height and width.

Images and labels larger than `max_image_pixels` (width x height; default PIL's decompression-bomb limit) are bad
examples, found from the file's header before anything is decoded (a PNG of 30000 x 30000 zeros is under 1 MB but
decodes to 900 M pixels). Formats that PIL cannot read are left to OpenCV, which has its own limit (2^30 pixels).
The pipelines pass the limit inside the record (`with_size_limit`), so that it reaches the loader from any source.

A bad example raises `BadExampleError` whose message is the one line `path: reason`.
"""

import io
import os
import threading
from typing import Any

import cv2
import numpy as np
from PIL import Image

from segnext_jax.data.datasets import DatasetSpec

_ACCEPTED_LABEL_MODES = ("L", "P")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS (it warns above, raises above twice)
LIMIT_SETTING = "config.data.max_image_pixels"  # where users change the limit, named in the reports
_PIL_LIMIT_LOCK = threading.Lock()  # guards the switching off of PIL's process-wide size check


class BadExampleError(ValueError):
    """An unusable image/label pair; `str(error)` is the report line `path: reason` (whitespace runs in the reason,
    e.g. newlines of a library's message, become single spaces)."""

    def __init__(self, path: str, reason: str):
        reason = " ".join(str(reason).split())
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def read_bytes(source: str | bytes, description: str) -> tuple[bytes, str]:
    """Returns (content, path for reports) of a file path, or of already-read bytes described by `description`."""
    if isinstance(source, bytes):
        return source, description
    try:
        with open(source, "rb") as f:
            return f.read(), source
    except FileNotFoundError:
        raise BadExampleError(source, "file missing") from None
    except OSError as error:
        raise BadExampleError(source, f"cannot read ({error.strerror})") from None


def _truncation(data: bytes) -> str | None:
    """Why a JPEG or PNG stream is cut short, or None.

    A JPEG must have a start-of-scan marker and an end-of-image marker after the last one (neither can occur inside
    entropy-coded data; an EXIF thumbnail's markers come before the main scan; bytes appended after the end are
    tolerated). A PNG must have an IDAT chunk and its IEND chunk after the last one.
    """
    last_scan = data.rfind(b"\xff\xda")
    if data[:2] == b"\xff\xd8" and (last_scan < 0 or data.rfind(b"\xff\xd9") < last_scan):
        return "truncated JPEG (no end-of-image marker after the last scan)"
    last_data = data.rfind(b"IDAT")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and (last_data < 0 or data.rfind(b"IEND") < last_data):
        return "truncated PNG (no IEND chunk after the image data)"
    return None


def _open_header(data: bytes) -> Image.Image:
    """PIL's lazy `Image.open` (reads the header only) with PIL's own size check off, so that the size of a huge
    file can be read: PIL would raise DecompressionBombError above twice its limit, and warn above it (an exception
    under `python -W error`). Our check (`check_size`) comes next, before any decoding."""
    with _PIL_LIMIT_LOCK:
        pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit


def _millions(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} M" if pixels >= 1_000_000 else f"{pixels:,}"


def check_size(width: int, height: int, path: str, max_image_pixels: int, setting: str = LIMIT_SETTING) -> None:
    """Raises BadExampleError when width x height exceeds `max_image_pixels`; the reason names `setting`."""
    if width * height > max_image_pixels:
        raise BadExampleError(
            path,
            f"{width} x {height} = {_millions(width * height)} pixels, over the limit of "
            f"{_millions(max_image_pixels)} ({setting})",
        )


def decode_image(
    data: bytes, path: str, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, setting: str = LIMIT_SETTING
) -> np.ndarray:
    """Decodes image bytes to uint8 RGB (H, W, 3) as MMSegmentation's loader would, or raises BadExampleError
    (also for an image over `max_image_pixels`, seen from its header; `setting` names the limit in the report)."""
    if not data:
        raise BadExampleError(path, "empty file")
    truncation = _truncation(data)
    if truncation:
        raise BadExampleError(path, truncation)
    try:
        with _open_header(data) as image:
            size = image.size
    except (OSError, ValueError, SyntaxError):  # a format PIL cannot read: OpenCV decides, as for any image
        size = None
    if size is not None:
        check_size(*size, path, max_image_pixels, setting)
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as error:  # e.g. OpenCV's own size limit
        raise BadExampleError(path, f"not a decodable image (OpenCV: {error.err})") from None
    if bgr is None:
        raise BadExampleError(path, "not a decodable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_label(
    data: bytes, path: str, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, setting: str = LIMIT_SETTING
) -> np.ndarray:
    """Decodes label bytes to their stored uint8 values (H, W), or raises BadExampleError for bad files/modes and
    for a label over `max_image_pixels` (seen from its header, before decoding)."""
    if not data:
        raise BadExampleError(path, "empty file")
    truncation = _truncation(data)
    if truncation:
        raise BadExampleError(path, truncation)
    try:
        image = _open_header(data)
    except (OSError, ValueError, SyntaxError) as error:
        raise BadExampleError(path, f"not a decodable label image ({error})") from None
    with image:
        check_size(*image.size, path, max_image_pixels, setting)
        try:  # PIL checks some formats' tiles against its own limit while decoding (when ours is higher)
            image.load()
            mode = image.mode
            values = np.asarray(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise BadExampleError(path, f"not a decodable label image ({err})") from None
    if mode not in _ACCEPTED_LABEL_MODES:
        kind = "16/32-bit" if mode.startswith("I") or mode == "F" else "colour" if len(mode) > 1 else "1-bit"
        raise BadExampleError(
            path, f"{kind} label (PIL mode {mode}): expected 8-bit class indices (mode L or P); re-run the converter"
        )
    return values


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """MMSegmentation's `reduce_zero_label`: 0 (unlabelled) -> 255, k -> k-1, 255 stays 255 (uint8 in and out)."""
    shifted = label.astype(np.int16) - 1
    return np.where((label == 0) | (label == 255), 255, shifted).astype(np.uint8)


def validate_label(label: np.ndarray, spec: DatasetSpec, path: str) -> None:
    """Raises BadExampleError when `label` (after reduce_zero_label) holds values that are neither class nor ignore."""
    counts = np.bincount(label.ravel(), minlength=256)
    counts[spec.ignore_index] = 0
    bad_values = np.flatnonzero(counts[spec.num_classes :]) + spec.num_classes
    if bad_values.size:
        shown = ", ".join(map(str, bad_values[:8])) + (", ..." if bad_values.size > 8 else "")
        raised = " after reduce_zero_label" if spec.reduce_zero_label else ""
        raise BadExampleError(
            path, f"label values {shown}{raised} are outside 0..{spec.num_classes - 1} and not {spec.ignore_index}"
        )


def with_size_limit(record: Any, max_image_pixels: int) -> Any:
    """`record` carrying the size limit for `load_example` / `find_problems` (a copy of a file or TFDS record; the
    generated demo records, indices of 128 x 128 scenes, are returned unchanged)."""
    return dict(record, max_image_pixels=int(max_image_pixels)) if isinstance(record, dict) else record


def _decoded(record: dict, key: str) -> tuple[np.ndarray, str]:
    """(decoded array, path for reports) of record[key], 'image' or 'label', within the record's size limit."""
    description = record.get(f"{key}_path", f"{record['name']} ({key})")
    data, path = read_bytes(record[key], description)
    limit = record.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    return (decode_image if key == "image" else decode_label)(data, path, max_image_pixels=limit), path


def _paired_label(
    image: np.ndarray, image_path: str, label: np.ndarray, label_path: str, spec: DatasetSpec
) -> np.ndarray:
    """The label with reduce_zero_label applied, after checking its size against the image and its values."""
    if label.shape != image.shape[:2]:
        raise BadExampleError(
            label_path,
            f"label size {label.shape[1]}x{label.shape[0]} differs from image size {image.shape[1]}x{image.shape[0]}"
            f" ({os.path.basename(image_path)})",
        )
    if spec.reduce_zero_label:
        label = reduce_zero_label(label)
    validate_label(label, spec, label_path)
    return label


def load_example(record: dict, spec: DatasetSpec) -> dict[str, np.ndarray | str]:
    """Loads and validates one record: dict(image, label) as file paths or encoded bytes, and name (optionally
    image_path / label_path naming byte contents in reports, and max_image_pixels, see `with_size_limit`).

    Returns dict(image=uint8 RGB (H, W, 3), label=uint8 (H, W) with reduce_zero_label applied, name=str), or raises
    BadExampleError naming the offending file.
    """
    image, image_path = _decoded(record, "image")
    label, label_path = _decoded(record, "label")
    return {"image": image, "label": _paired_label(image, image_path, label, label_path, spec), "name": record["name"]}


def find_problems(record: dict, spec: DatasetSpec) -> list[str]:
    """Every `path: reason` report of one record: the image's and the label's own problems (both, when both files
    are bad), else the pair's (size mismatch, label values); empty for a good example."""
    decoded, reports = [], []
    for key in ("image", "label"):
        try:
            decoded.append(_decoded(record, key))
        except BadExampleError as error:
            reports.append(str(error))
    if not reports:
        try:
            _paired_label(*decoded[0], *decoded[1], spec)
        except BadExampleError as error:
            reports.append(str(error))
    return reports
