"""Image preprocessing of the M2FP pipeline: the multi-human shortest-edge resize and the single-human centring.

Both functions take a decoded RGB uint8 image (H, W, 3) and return a uint8 image; the network's normalisation
and zero padding to multiples of 32 happen later, in the model (`M2FP.normalize_and_pad`). Resizing uses
Pillow's bilinear filter (which antialiases when downscaling), as the ModelScope pipeline does, so that the
network sees the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

SINGLE_HUMAN_PAD_VALUE = (
    128  # grey the single-human image is centre-padded with (before normalisation)
)


@dataclass(frozen=True)
class PreprocessedImage:
    """A network-ready uint8 RGB image plus what postprocessing needs to map results back.

    Attributes:
        image: (h, w, 3) uint8 RGB, the network input before normalisation and padding.
        original_size: (height, width) of the image that was given to the preprocessing.
        crop_box: single-human only: (x0, y0, x1, y1) of the (resized) original inside `image`; None for the
            multi-human resize, where `image` is the whole resized original.
    """

    image: np.ndarray
    original_size: tuple[int, int]
    crop_box: tuple[int, int, int, int] | None = None


def check_rgb_image(image: np.ndarray) -> None:
    """Raise ValueError unless `image` is a non-empty (H, W, 3) uint8 array."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, but got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must have dtype uint8, but got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), but got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be at least 1x1 pixels, but got {image.shape}")


def shortest_edge_size(
    height: int, width: int, min_size: int = 640, max_size: int = 1333
) -> tuple[int, int]:
    """Return (new_height, new_width): the shortest side scaled to `min_size`, the longest capped at `max_size`.

    Same arithmetic (float scale, then `int(x + 0.5)`) as detectron2's ResizeShortestEdge used by ModelScope,
    except that a side is never rounded down to 0 (extreme aspect ratios, where the reference would fail).
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, but got {height} and {width}")
    scale = min_size / min(height, width)
    if height < width:
        new_height, new_width = float(min_size), scale * width
    else:
        new_height, new_width = scale * height, float(min_size)
    if max(new_height, new_width) > max_size:
        scale = max_size * 1.0 / max(new_height, new_width)
        new_height, new_width = new_height * scale, new_width * scale
    return max(1, int(new_height + 0.5)), max(1, int(new_width + 0.5))


def pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a uint8 RGB image to (height, width) with Pillow's bilinear filter."""
    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    return np.array(resized)  # writable copy (torch.from_numpy warns on read-only arrays)


def resize_shortest_edge(
    image: np.ndarray, min_size: int = 640, max_size: int = 1333
) -> np.ndarray:
    """Multi-human preprocessing: resize so the shortest side is `min_size` (longest at most `max_size`)."""
    check_rgb_image(image)
    new_height, new_width = shortest_edge_size(image.shape[0], image.shape[1], min_size, max_size)
    return pil_resize(image, new_height, new_width)


def fit_within(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """Return the single-human resized (height, width): shrink, keeping the aspect, to fit the target; never enlarge.

    Sizes are truncated (`int()`), like the reference, but never to 0. When both sides are too big, the longer
    side is fitted first and the other one is refitted if it still exceeds its target.
    """
    new_height, new_width = _fit_within_truncated(height, width, target_height, target_width)
    return max(1, new_height), max(1, new_width)


def _fit_within_truncated(
    height: int, width: int, target_height: int, target_width: int
) -> tuple[int, int]:
    """The reference's fitting arithmetic (may give 0 for extreme aspect ratios)."""
    # Integer floor division equals int(a * b / c) for these magnitudes (exact integer product, positive).
    if height > target_height and width > target_width:
        if height >= width:
            new_height, new_width = target_height, target_height * width // height
            if new_width > target_width:
                new_width, new_height = target_width, target_width * height // width
        else:
            new_width, new_height = target_width, target_width * height // width
            if new_height > target_height:
                new_height, new_width = target_height, target_height * width // height
        return new_height, new_width
    if height > target_height:
        return target_height, target_height * width // height
    if width > target_width:
        return target_width * height // width, target_width
    return height, width


def center_to_target_size(
    image: np.ndarray, target_size: tuple[int, int] = (384, 512)
) -> PreprocessedImage:
    """Single-human preprocessing: shrink to fit `target_size` (width, height), then centre-pad with grey 128.

    Reproduces a quirk of the reference: when the left and top padding are both 0 (the image is at most one
    pixel short in each dimension), the image is returned unpadded; the network's zero padding to multiples
    of 32 then covers the gap.
    """
    check_rgb_image(image)
    target_width, target_height = target_size
    if target_width < 1 or target_height < 1:
        raise ValueError(f"target_size must be positive (width, height), but got {target_size}")
    height, width = image.shape[:2]
    new_height, new_width = fit_within(height, width, target_height, target_width)
    resized = pil_resize(image, new_height, new_width)
    pad_left = (target_width - new_width) // 2
    pad_top = (target_height - new_height) // 2
    crop_box = (pad_left, pad_top, pad_left + new_width, pad_top + new_height)
    if pad_left == 0 and pad_top == 0:
        return PreprocessedImage(np.ascontiguousarray(resized), (height, width), crop_box)
    pad_right = target_width - new_width - pad_left
    pad_bottom = target_height - new_height - pad_top
    padded = np.pad(
        resized,
        ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)),
        mode="constant",
        constant_values=SINGLE_HUMAN_PAD_VALUE,
    )
    return PreprocessedImage(padded, (height, width), crop_box)


def preprocess_image(
    image: np.ndarray,
    single_human: bool,
    min_size: int = 640,
    max_size: int = 1333,
    single_human_input_size: tuple[int, int] = (384, 512),
) -> PreprocessedImage:
    """Run the variant's preprocessing on an RGB uint8 image (H, W, 3)."""
    if single_human:
        return center_to_target_size(image, single_human_input_size)
    resized = resize_shortest_edge(image, min_size, max_size)
    return PreprocessedImage(np.ascontiguousarray(resized), (image.shape[0], image.shape[1]), None)
