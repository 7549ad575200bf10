"""Rendering a result's label map as a palette PNG (`GET /v1/jobs/{id}/result?format=palette`).

The worker stores the label map as a base64 single-channel PNG inside the result JSON; this
module turns it into a paletted PNG coloured with `shared.constants.PALETTE`, in memory. The
input is our own sealed output, already decrypted; any failure is a server error (500), logged
by exception type only.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from io import BytesIO

from PIL import Image, UnidentifiedImageError

from shared.constants import PALETTE
from shared.errors import ServiceError
from shared.logging import event

log = logging.getLogger(__name__)

_FLAT_PALETTE = [channel for colour in PALETTE for channel in colour]
_PALETTE_768 = _FLAT_PALETTE + [0] * (768 - len(_FLAT_PALETTE))
_NOT_RENDERABLE = (KeyError, TypeError, ValueError, binascii.Error, UnidentifiedImageError, OSError)


def palette_png(result: bytes) -> bytes:
    """The result's label map as a palette PNG coloured with shared.constants.PALETTE."""
    try:
        paletted = _label_image(result)
    except _NOT_RENDERABLE as exc:
        event(log, "result_not_renderable", logging.ERROR, exc_type=type(exc).__name__)
        raise ServiceError() from exc
    paletted.putpalette(_PALETTE_768)
    buffer = BytesIO()
    paletted.save(buffer, format="PNG")
    return buffer.getvalue()


def _label_image(result: bytes) -> Image.Image:
    """The label map of a result document as a "P" image (class id = palette index)."""
    encoded = json.loads(result)["label_map_png"]
    with Image.open(BytesIO(base64.b64decode(encoded, validate=True)), formats=["PNG"]) as labels:
        if labels.mode not in ("L", "P"):
            raise ValueError("label map is not single-channel")
        return Image.frombytes("P", labels.size, labels.tobytes())
