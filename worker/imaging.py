"""Decoding uploaded image bytes in memory, under pixel limits, and encoding result maps.

Owns everything the worker does with image *bytes*: the limits are set before OpenCV is first
imported (OpenCV reads `OPENCV_IO_MAX_IMAGE_PIXELS` once, at load: RESEARCH §3.2), decoding uses
Pillow restricted to JPEG and PNG with its decompression-bomb guard turned into an error, the EXIF
orientation is applied (then all metadata is dropped), and every mode a photo may come in
(8/16-bit grey, palette, RGBA, CMYK, 16-bit RGB) becomes RGB uint8. Nothing is written to disk.
Any failure raises `UndecodableImage` / `TooManyPixels`, which end the job, never the worker.
"""

from __future__ import annotations

import base64
import io
import os
import warnings

# Must precede the first `import cv2` in the process (this module is the worker's only importer).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64_000_000))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageFile, ImageOps  # noqa: E402

from shared.errors import TooManyPixels, UndecodableImage  # noqa: E402

ImageFile.LOAD_TRUNCATED_IMAGES = False
ALLOWED_FORMATS = ("JPEG", "PNG")


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB; 16-bit data is scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.asarray(image, dtype=np.uint32)
        grey = (grey >> 8) if grey.max(initial=0) > 255 else grey
        return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white: transparent pixels otherwise keep arbitrary hidden colours.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode JPEG/PNG bytes to an upright (H, W, 3) uint8 RGB array, in memory only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max_pixels
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise TooManyPixels()
                image.load()
                upright = ImageOps.exif_transpose(image)
                rgb = _to_rgb(upright)
    except (TooManyPixels, UndecodableImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooManyPixels() from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.UnidentifiedImageError) as exc:
        raise UndecodableImage() from exc
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise UndecodableImage()
    return np.ascontiguousarray(rgb)


def png_base64(array: np.ndarray) -> str:
    """Encode a (H, W) uint8 map as a single-channel 8-bit PNG, base64 text."""
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"expected a (H, W) uint8 map, got {array.dtype} {array.shape}")
    ok, encoded = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding failed")
    return base64.b64encode(encoded.tobytes()).decode()
