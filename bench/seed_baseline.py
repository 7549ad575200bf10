"""The seed article's design, for the load benchmark's table: inference inside the request.

One Flask app whose `/parse` decodes the upload and runs M2FP before it answers, as the seed's
`/parse` does, served by one synchronous gunicorn worker; `/healthz` answers from the same
process. It exists only so `bench/load_bench.py` can measure it side by side with the service
under the same load; it is not part of the service (no validation, no limits, no encryption).

    gunicorn -w 1 -b 127.0.0.1:8100 bench.seed_baseline:app     # M2FP_BENCH_THREADS=2
"""

from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path

import cv2
import flask
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.m2fp.predictor import Predictor

app = flask.Flask(__name__)
# Benchmark-only knob (the service reads its settings in shared/config.py; this is not the service).
_predictor = Predictor.from_weights(
    "random", threads=int(os.environ.get("M2FP_BENCH_THREADS", "2"))
)


@app.post("/parse")
def parse() -> flask.Response:
    """Decode the upload and parse it now; the answer is the label map as a base64 PNG."""
    upload = flask.request.files.get("image")
    if upload is None:
        return flask.jsonify(error="missing_image"), 400
    pixels = cv2.imdecode(np.frombuffer(upload.read(), np.uint8), cv2.IMREAD_COLOR)
    if pixels is None:
        return flask.jsonify(error="undecodable_image"), 422
    result = _predictor.predict(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB))
    buffer = io.BytesIO()
    Image.fromarray(result.label_map).save(buffer, format="PNG")
    return flask.jsonify(label_map_png=base64.b64encode(buffer.getvalue()).decode())


@app.get("/healthz")
def healthz() -> flask.Response:
    """Liveness, from the same single process."""
    return flask.jsonify(status="ok")
