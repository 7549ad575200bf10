"""Offline human parsing, no server needed: `python -m worker.m2fp --weights PATH IMAGE... --out DIR`.

For each image NAME.ext it writes NAME.labels.png (8-bit, class id per pixel), NAME.instances.png (8-bit,
person index per pixel, 0 = no person) and NAME.json (size, persons, parts, classes present, timings).
Unreadable images are reported on one line each and skipped; the exit status is 1 if any image failed.
M2FP_DEFORM_ATTN (auto|op|reference) chooses the deformable-attention path, and M2FP_PRECISION
(auto|fp32|bf16x3|bf16|int8, or --precision) the network's arithmetic, as in the worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from shared.config import PRECISION_MODES
from shared.constants import RANDOM_WEIGHTS, UNTRAINED_WARNING

if TYPE_CHECKING:  # torch is imported only once the arguments are valid
    from worker.m2fp.predictor import ParsingResult, Predictor

PUBLIC_VARIANTS = ("cihp", "lip")
HIDDEN_VARIANTS = ("tiny",)  # a tiny random network for fast tests; not shown in --help

RANDOM_WEIGHTS_BANNER = "\n".join(("#" * 78, f"# {UNTRAINED_WARNING}", "#" * 78))


# long-by-design: the argument table of the CLI, one add_argument per option
def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m worker.m2fp",
        description="Parse people in images with M2FP, offline. Writes NAME.labels.png (class id per pixel), "
        "NAME.instances.png (person index per pixel, 0 = none) and NAME.json for every IMAGE.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument(
        "--weights",
        required=True,
        metavar="PATH|random",
        help="checkpoint file or ModelScope model directory (pytorch_model.pt), or 'random' for "
        "an untrained model (for testing the tooling only)",
    )
    parser.add_argument(
        "--variant",
        default="cihp",
        type=str.lower,
        metavar="{cihp,lip}",
        help="cihp: multi-person model (default); lip: single-person model",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)"
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output folder (created if missing)"
    )
    parser.add_argument(
        "--max-side",
        type=int,
        default=1920,
        help="images with a longer side are shrunk for inference; outputs keep the input size "
        "(default: 1920)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--precision",
        type=str.lower,
        choices=PRECISION_MODES,
        default=None,
        help="network arithmetic: auto (bf16 where the CPU has it in hardware, else fp32), fp32, "
        "bf16 or int8 (default: M2FP_PRECISION, else auto)",
    )
    arguments = parser.parse_args(argv)
    if arguments.variant not in PUBLIC_VARIANTS + HIDDEN_VARIANTS:
        parser.error(
            f"argument --variant: invalid choice {arguments.variant!r} (choose from cihp, lip)"
        )
    return arguments


def read_rgb_image(path: Path) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB, applying its EXIF orientation."""
    with Image.open(path) as opened:
        upright = ImageOps.exif_transpose(opened)
        return np.asarray(upright.convert("RGB"))


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct output name per input: the file stem, with -2, -3, ... appended on collisions."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}-{count}")
    return stems


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a (H, W) uint8 array as a single-channel 8-bit PNG."""
    Image.fromarray(array, mode="L").save(path, format="PNG")


def result_document(
    result: ParsingResult,
    class_names: Sequence[str],
    variant: str,
    untrained: bool,
    precision: str = "fp32",
) -> dict:
    """The JSON document of one parsed image."""
    height, width = result.label_map.shape
    return {
        "width": int(width),
        "height": int(height),
        "variant": variant,
        "untrained": untrained,
        "classes": {str(class_id): name for class_id, name in enumerate(class_names)},
        "classes_present": [
            {"class_id": class_id, "name": class_names[class_id]}
            for class_id in result.classes_present
        ],
        "persons": result.persons,
        "parts": result.parts,
        "timings": {name: round(seconds, 4) for name, seconds in result.timings.items()},
        "precision": precision,
    }


class Progress:
    """A one-line stderr progress display (count, percentage, elapsed time, ETA)."""

    def __init__(self, total: int, stream=sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.started = time.monotonic()
        self.interactive = hasattr(stream, "isatty") and stream.isatty()

    def update(self, done: int, name: str) -> None:
        """Show that `done` of `total` images are finished, the last being `name`."""
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (self.total - done) if done else 0.0
        line = (
            f"[{done}/{self.total}] {100 * done // self.total:3d}%  elapsed {format_seconds(elapsed)}  "
            f"ETA {format_seconds(eta)}  {name}"
        )
        if self.interactive:
            self.stream.write("\r\033[K" + line + ("\n" if done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a message on its own line without garbling the progress line."""
        self.stream.write(("\r\033[K" if self.interactive else "") + text + "\n")
        self.stream.flush()


def format_seconds(seconds: float) -> str:
    """12.3s, 4m05s or 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def load_predictor(arguments: argparse.Namespace) -> Predictor:
    """The CLI's predictor, through the service's loader (`Predictor.from_weights`).

    Honours M2FP_DEFORM_ATTN and M2FP_PRECISION (read in `shared.config`; --precision wins);
    raises ConfigError, ValueError, OSError or RuntimeError with a message for the user.
    """
    from shared.config import deform_attn_mode, precision_mode
    from worker.m2fp.predictor import Predictor  # torch import: only once the arguments are valid

    return Predictor.from_weights(
        arguments.weights,
        variant=arguments.variant,
        device=arguments.device,
        max_side=arguments.max_side,
        threads=arguments.threads,
        deform_attn=deform_attn_mode(),  # M2FP_DEFORM_ATTN: auto | op | reference
        precision_mode=arguments.precision or precision_mode(),  # M2FP_PRECISION
    )


def parse_one(predictor: Predictor, path: Path, out: Path, stem: str) -> str | None:
    """Parse one image file into `out/stem.*`; returns an error message, or None when written."""
    try:
        image = read_rgb_image(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        return f"error: cannot read {path}: {type(exc).__name__}: {reason}"
    try:
        result = predictor.predict(image)
        write_png(out / f"{stem}.labels.png", result.label_map)
        write_png(out / f"{stem}.instances.png", result.instance_map)
        document = result_document(
            result,
            predictor.class_names,
            predictor.variant,
            predictor.untrained,
            predictor.precision,
        )
        (out / f"{stem}.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    except (ValueError, OSError, RuntimeError) as exc:
        return f"error: cannot parse {path}: {type(exc).__name__}: {exc}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if arguments.weights == RANDOM_WEIGHTS:
        print(RANDOM_WEIGHTS_BANNER, file=sys.stderr)
    from shared.errors import ConfigError

    try:
        predictor = load_predictor(arguments)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: cannot load the model: {exc}", file=sys.stderr)
        return 2
    if predictor.precision != "fp32":
        print(f"precision: {predictor.precision_choice.describe()}", file=sys.stderr)
        print(f"backbone: {predictor.backbone_path}", file=sys.stderr)
        print(f"3x3 convolutions: {predictor.winograd_path}", file=sys.stderr)
        print(f"AMX products: {predictor.amx_path}", file=sys.stderr)
        print(f"encoder: {predictor.encoder_path}", file=sys.stderr)
        print(f"dense products: {predictor.dense_path}", file=sys.stderr)
    arguments.out.mkdir(parents=True, exist_ok=True)
    paths = [Path(image) for image in arguments.images]
    progress = Progress(len(paths))
    failures = 0
    for done, (path, stem) in enumerate(zip(paths, output_stems(paths), strict=True), start=1):
        error = parse_one(predictor, path, arguments.out, stem)
        if error is not None:
            failures += 1
            progress.message(error)
        progress.update(done, path.name)
    if failures:
        print(f"{failures} of {len(paths)} images failed", file=sys.stderr)
    if predictor.untrained:
        print(f"reminder: {UNTRAINED_WARNING}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
