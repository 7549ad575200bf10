"""The one way this service opens an untrusted image with Pillow: `open_untrusted`.

Both the gateway's header check (`api.validation.read_dimensions`) and the worker's decode
(`worker.imaging.decode_upload`) open uploads through it, so they agree on what is refused:
- only the formats asked for (JPEG, PNG) are tried: Pillow never guesses among its ~40 decoders;
- Pillow's decompression-bomb guard is an error, not a warning (it warns between 1x and 2x
  `Image.MAX_IMAGE_PIXELS`, set to the caller's pixel limit for the call), and a header that says
  more than `max_pixels` is refused before any pixel is decoded -> `TooManyPixels`;
- any decoder failure (unreadable or truncated data, a bad header) -> `UndecodableImage`;
  errors of the service (`ServiceError`) and `MemoryError` pass through unchanged.

The open is lazy: only the header is parsed until the caller calls `load()`. The warning filter and
the pixel limit are process-global state in Pillow and `warnings`, so one thread at a time holds
them (the gateway runs threads; a worker pool process decodes one job at a time). Pillow is the
only imaging dependency here: no numpy, no OpenCV, neither flask nor torch.
"""

from __future__ import annotations

import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO

from PIL import Image, ImageFile, UnidentifiedImageError

from shared.errors import ServiceError, TooManyPixels, UndecodableImage

ImageFile.LOAD_TRUNCATED_IMAGES = False
UPLOAD_FORMATS = ("JPEG", "PNG")
_DECODER_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error)
_GUARD = threading.Lock()


@contextmanager
def open_untrusted(
    data: bytes, max_pixels: int, formats: tuple[str, ...] = UPLOAD_FORMATS
) -> Iterator[Image.Image]:
    """Open `data` lazily as one of `formats` under the bomb guard (see the module doc).

    Exceptions raised inside the `with` block are translated the same way as the open's own.
    """
    try:
        with _GUARD, warnings.catch_warnings(), _pixel_limit(max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(BytesIO(data), formats=list(formats)) as image:
                if image.width * image.height > max_pixels:
                    raise TooManyPixels()
                yield image
    except ServiceError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooManyPixels() from exc
    except _DECODER_ERRORS as exc:
        raise UndecodableImage() from exc


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's bomb limit set to `max_pixels` for the block, then restored (caller holds _GUARD)."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous
