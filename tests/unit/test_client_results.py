"""m2fp_client.results: a result document decodes to typed arrays, PNG maps (grey and palette)
keep every value, malformed maps are protocol errors, and the palette is the server's."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from m2fp_client import (
    PALETTE,
    ParsingResult,
    ProtocolError,
    decode_png_map,
)
from m2fp_client.results import colorize, palette_png
from shared import constants
from tests.unit.client_doubles import png_b64, result_document


def test_result_document_decodes_to_typed_arrays():
    result = ParsingResult.from_json(result_document())
    assert result.label_map.shape == (4, 6) and result.label_map.dtype == np.uint8
    assert result.label_map[1, 1] == 13 and result.label_map[0, 5] == 2
    assert result.instance_map.max() == 1 and result.person_mask(1).sum() == 5
    assert result.classes[13] == "Face" and result.classes_present == [0, 2, 13]
    assert result.persons[0].box == (1, 0, 6, 3) and result.untrained and result.warnings
    assert json.loads(json.dumps(result.summary()))["persons"][0]["index"] == 1


def test_decode_png_map_keeps_every_value_0_to_255():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(decode_png_map(png_b64(values), (16, 16)), values)


def test_decode_png_map_reads_palette_indices():
    labels = np.array([[0, 5], [19, 13]], np.uint8)
    text = base64.b64encode(palette_png(labels)).decode()
    assert np.array_equal(decode_png_map(text), labels)


@pytest.mark.parametrize("bad", ["rgb", "shape", "base64"])
def test_bad_maps_are_protocol_errors(bad):
    document = result_document()
    if bad == "rgb":
        buffer = io.BytesIO()
        Image.new("RGB", (6, 4)).save(buffer, format="PNG")
        document["label_map_png"] = base64.b64encode(buffer.getvalue()).decode()
    elif bad == "shape":
        document["instance_map_png"] = png_b64(np.zeros((3, 6), np.uint8))
    else:
        document["label_map_png"] = "not base64!"
    with pytest.raises(ProtocolError):
        ParsingResult.from_json(document)


def test_client_palette_matches_the_server_palette():
    assert PALETTE == constants.PALETTE
    assert colorize(np.array([[5]], np.uint8))[0, 0].tolist() == list(constants.PALETTE[5])
