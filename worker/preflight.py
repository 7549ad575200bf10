"""`python -m worker.preflight`: load the configured model once and report, then exit.

Run by `python -m worker` in a subprocess before Celery starts (so the worker's parent never
imports torch). Exit status 0 when the checkpoint loads (every key and shape checked); otherwise
a one-line error naming the problem (missing file, wrong digest, first mismatched key...).
"""

from __future__ import annotations

import json
import sys
import time

from shared.config import ConfigError, load_settings, resolve_weights
from shared.hardening import disable_core_dumps
from worker.weights import settings_predictor


def main() -> int:
    """Load the model as a worker child would and print a JSON summary."""
    disable_core_dumps()  # it decrypts the checkpoint and holds the data keys
    try:
        settings = load_settings()
        weights = resolve_weights(settings)
        import torch

        torch.set_num_threads(1)
        tic = time.monotonic()
        predictor = settings_predictor(settings, "cpu", weights)
        loaded = time.monotonic() - tic
        untrained = predictor.untrained
        del predictor
    except ConfigError as exc:
        print(f"m2fp preflight: configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(
            f"m2fp preflight: cannot load the model: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        return 1
    print(
        json.dumps(
            {
                "preflight": "ok",
                "variant": settings.variant,
                "untrained": untrained,
                "load_seconds": round(loaded, 2),
            }
        ),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
