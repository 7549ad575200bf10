"""Decoding uploaded image bytes in memory, under pixel limits, and encoding result maps.

Owns everything the worker does with image *bytes*: the limits are set before OpenCV is first
imported (OpenCV reads `OPENCV_IO_MAX_IMAGE_PIXELS` once, at load: RESEARCH §3.2), decoding opens
the upload with `shared.imaging.open_untrusted` (JPEG and PNG only, the decompression-bomb guard
an error: the same open as the gateway's header check), the EXIF
orientation is applied (then all metadata is dropped), and every mode a photo may come in
(8/16-bit grey, palette, RGBA, CMYK, 16-bit RGB) becomes RGB uint8. Nothing is written to disk.
Any failure raises `UndecodableImage` / `TooManyPixels`, which end the job, never the worker.

Memory is bounded before any pixel is decoded: the header gives width, height, channels and bit
depth, and an image whose decoded size (pixels x channels x bytes per sample) is over the budget
(`M2FP_MAX_DECODE_MB`) is refused with `DecodeTooLarge` (a 350 KB 10000x4000 RGBA PNG decodes to
160 MB, and to about 1 GB with the conversions). A JPEG larger than the inference size is decoded
with Pillow's `draft()`, i.e. by the JPEG decoder's DCT scaling to 1/2, 1/4 or 1/8, to the
smallest scale that is still at least the inference size (`M2FP_INFER_MAX_SIDE`), never below:
the network sees the same resolution, and the caller scales the maps back to the upload size.
"""

from __future__ import annotations

import base64
import math
import os
import struct
from dataclasses import dataclass

# Must precede the first `import cv2` in the process (this module is the worker's only importer).
# A setting for OpenCV, written here, not configuration read: shared.config reads the environment.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64_000_000))

import cv2
import numpy as np
from PIL import Image, ImageOps

from shared.errors import DecodeTooLarge, UndecodableImage
from shared.imaging import open_untrusted


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB; 16-bit data is scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.asarray(image, dtype=np.uint32)
        scaled = (grey >> 8) if grey.max(initial=0) > 255 else grey
        return np.repeat(scaled.astype(np.uint8)[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white: transparent pixels otherwise keep arbitrary hidden colours.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image and the upright size of the upload it came from.

    `rgb` is smaller than (height, width) when a JPEG was decoded with `draft()`.
    """

    rgb: np.ndarray
    width: int
    height: int


PNG_CHANNELS = {
    0: 1,
    2: 3,
    3: 3,
    4: 2,
    6: 4,
}  # IHDR colour type -> samples per pixel (palette expands to RGB)


def decode_cost(image: Image.Image, data: bytes) -> int:
    """Bytes the decoded pixels take: width x height x channels x bytes per sample, from the header."""
    width, height = image.size
    if image.format == "PNG" and len(data) >= 26 and data[12:16] == b"IHDR":
        bit_depth, colour_type = struct.unpack(">BB", data[24:26])
        channels = PNG_CHANNELS.get(colour_type, 4)
        if colour_type == 3 and "transparency" in image.info:
            channels = 4
        sample_bytes = 2 if bit_depth == 16 else 1
    else:
        channels = max(1, int(getattr(image, "layers", 0) or len(image.getbands())))
        sample_bytes = 2 if int(getattr(image, "bits", 8) or 8) > 8 else 1
    return width * height * channels * sample_bytes


def draft_size(width: int, height: int, target_side: int | None) -> tuple[int, int] | None:
    """The smallest size `draft()` may reach: the image scaled so its long side is `target_side`."""
    if not target_side or max(width, height) <= target_side:
        return None
    scale = target_side / max(width, height)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def _upright_size(image: Image.Image, width: int, height: int) -> tuple[int, int]:
    orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def decode_upload(
    data: bytes,
    *,
    max_pixels: int,
    max_decode_bytes: int | None = None,
    target_side: int | None = None,
) -> DecodedImage:
    """Decode JPEG/PNG bytes in memory under the pixel and decode-size limits (see the module doc).

    MemoryError (the pool child's memory limit) propagates: the job fails `out_of_memory`.
    """
    with open_untrusted(data, max_pixels) as image:
        width, height = image.size
        upright_width, upright_height = _upright_size(image, width, height)
        wanted = draft_size(width, height, target_side)
        if image.format == "JPEG" and wanted is not None:
            image.draft(None, wanted)
        if max_decode_bytes is not None and decode_cost(image, data) > max_decode_bytes:
            raise DecodeTooLarge()
        image.load()
        upright = ImageOps.exif_transpose(image)
        rgb = _to_rgb(upright)
        del upright
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise UndecodableImage()
    return DecodedImage(np.ascontiguousarray(rgb), upright_width, upright_height)


def decode_image(
    data: bytes, *, max_pixels: int, max_decode_bytes: int | None = None
) -> np.ndarray:
    """Decode JPEG/PNG bytes to an upright (H, W, 3) uint8 RGB array at full size, in memory only."""
    return decode_upload(data, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes).rgb


def png_base64(array: np.ndarray) -> str:
    """Encode a (H, W) uint8 map as a single-channel 8-bit PNG, base64 text."""
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"expected a (H, W) uint8 map, got {array.dtype} {array.shape}")
    ok, encoded = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding failed")
    return base64.b64encode(encoded.tobytes()).decode()
