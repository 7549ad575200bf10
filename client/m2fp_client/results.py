"""Typed views of the service's JSON: Job, JobStatus, Person, ParsingResult; PNG decoding."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from m2fp_client.errors import ProtocolError

# CIHP colours (RGB) per class id, the same table as the server's shared/constants.py PALETTE.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (128, 0, 0), (255, 0, 0), (0, 85, 0), (170, 0, 51), (255, 85, 0), (0, 0, 85),
    (0, 119, 221), (85, 85, 0), (0, 85, 85), (85, 51, 0), (52, 86, 128), (0, 128, 0),
    (0, 0, 255), (51, 170, 221), (0, 255, 255), (85, 255, 170), (170, 255, 85),
    (255, 255, 0), (255, 170, 0),
)  # fmt: skip

TERMINAL_STATUSES = ("done", "failed", "expired")


@dataclass(frozen=True)
class Job:
    """A submitted job: its id, its secret bearer token and its URLs (absolute)."""

    job_id: str
    token: str = field(repr=False)
    status_url: str
    result_url: str
    expires_in: int | None = None


@dataclass(frozen=True)
class JobStatus:
    """A job's status; `error_code`/`error_message` are set when it failed or expired."""

    job_id: str
    status: str
    error_code: str | None = None
    error_message: str | None = None

    @property
    def finished(self) -> bool:
        """True once the job will not change any more (done, failed or expired)."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> JobStatus:
        """Build from the body of GET /v1/jobs/{id}."""
        error = document.get("error") or {}
        if not isinstance(error, dict):
            error = {"code": str(error), "message": ""}
        return cls(
            job_id=str(document.get("job_id", "")),
            status=str(document.get("status", "")),
            error_code=error.get("code"),
            error_message=error.get("message"),
        )


@dataclass(frozen=True)
class Person:
    """One detected person: 1-based `index` (its value in the instance map), box [x0, y0, x1, y1]."""

    index: int
    score: float
    box: tuple[int, int, int, int]
    area: int
    parts: list[dict[str, Any]]

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Person:
        """Build from one entry of the result's `persons` list."""
        x0, y0, x1, y1 = (int(v) for v in document.get("box", (0, 0, 0, 0)))
        return cls(
            index=int(document["index"]),
            score=float(document.get("score", 0.0)),
            box=(x0, y0, x1, y1),
            area=int(document.get("area", 0)),
            parts=list(document.get("parts", [])),
        )


@dataclass
class ParsingResult:
    """A parsing: per-pixel class ids and person indices, plus per-person summaries."""

    width: int
    height: int
    label_map: np.ndarray  # (H, W) uint8 CIHP class ids 0..19
    instance_map: np.ndarray  # (H, W) uint8 person index, 0 = no person
    persons: list[Person]
    parts: list[dict[str, Any]]
    classes: dict[int, str]
    untrained: bool
    warnings: list[str]
    classes_present: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    job_id: str | None = None

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ParsingResult:
        """Build from the body of GET /v1/jobs/{id}/result, decoding both PNG maps."""
        try:
            width, height = int(document["width"]), int(document["height"])
            label_map = decode_png_map(document["label_map_png"], (height, width))
            instance_map = decode_png_map(document["instance_map_png"], (height, width))
            classes = {int(k): str(v) for k, v in document.get("classes", {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError("bad_result", f"the result document is not valid: {exc}") from exc
        present = document.get("classes_present")
        return cls(
            width=width,
            height=height,
            label_map=label_map,
            instance_map=instance_map,
            persons=[Person.from_json(p) for p in document.get("persons", [])],
            parts=list(document.get("parts", [])),
            classes=classes,
            untrained=bool(document.get("untrained", False)),
            warnings=[str(w) for w in document.get("warnings", [])],
            classes_present=[int(c) for c in present]
            if present is not None
            else sorted(int(c) for c in np.unique(label_map)),
            timings=dict(document.get("timings", {})),
            job_id=document.get("job_id"),
        )

    def person_mask(self, index: int) -> np.ndarray:
        """(H, W) bool mask of the pixels of person `index`."""
        return self.instance_map == index

    def class_mask(self, class_id: int) -> np.ndarray:
        """(H, W) bool mask of the pixels labelled `class_id`."""
        return self.label_map == class_id

    def colorized(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB rendering of the label map with the CIHP palette."""
        return colorize(self.label_map)

    def summary(self) -> dict[str, Any]:
        """A JSON-safe summary: size, persons, parts, classes present (no pixel data)."""
        return {
            "width": self.width,
            "height": self.height,
            "classes_present": {str(c): self.classes.get(c, str(c)) for c in self.classes_present},
            "persons": [
                {
                    "index": p.index,
                    "score": p.score,
                    "box": list(p.box),
                    "area": p.area,
                    "parts": p.parts,
                }
                for p in self.persons
            ],
            "parts": self.parts,
            "untrained": self.untrained,
            "warnings": self.warnings,
            "timings": self.timings,
        }


def decode_png_map(text: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Base64 single-channel 8-bit PNG -> (H, W) uint8 array (palette PNGs give their indices)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError) as exc:
        raise ValueError("map is not valid base64") from exc
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"map PNG must be single-channel 8-bit, got mode {image.mode}")
        array = np.array(image, dtype=np.uint8)
    if shape is not None and array.shape != shape:
        raise ValueError(
            f"map is {array.shape[1]}x{array.shape[0]}, expected {shape[1]}x{shape[0]}"
        )
    return array


def colorize(label_map: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB with PALETTE (unknown ids become black)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(PALETTE)] = PALETTE
    return lut[label_map]


def palette_png(label_map: np.ndarray) -> bytes:
    """A palette ("P" mode) PNG whose pixel values are still the class ids, shown in colour."""
    label_map = np.ascontiguousarray(label_map, dtype=np.uint8)
    image = Image.frombytes("P", (label_map.shape[1], label_map.shape[0]), label_map.tobytes())
    flat = [value for colour in PALETTE for value in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def grey_png(array: np.ndarray) -> bytes:
    """A single-channel 8-bit PNG of a (H, W) uint8 map."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
