"""`m2fp`: parse photos from the command line.

    m2fp parse photo.jpg more/ --server http://127.0.0.1:8000 -o out/ [--api-key-file F] [--palette]
    m2fp health --server URL

For each photo it writes NAME.labels.png (class ids), NAME.instances.png (person indices) and
NAME.json (persons, parts, classes present). A failed photo gets one line on stderr naming its
error code, and the run goes on; the exit status is 1 if any photo failed, 2 on a usage error.
The API key is read from a file or $M2FP_API_KEY, never from the command line (`ps` shows argv).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from m2fp_client.client import Client
from m2fp_client.errors import Banned, ConnectionFailed, M2FPError, Unauthorized
from m2fp_client.results import ParsingResult, grey_png, palette_png

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FATAL_ERRORS = (Unauthorized, Banned, ConnectionFailed)  # every later file would fail the same way
DEFAULT_SERVER = "http://127.0.0.1:8000"


def expand_inputs(
    paths: Iterable[str | Path], recursive: bool = False
) -> tuple[list[Path], list[Path]]:
    """Files to parse (directories expand to their .jpg/.jpeg/.png files, sorted) and missing paths."""
    files: list[Path] = []
    missing: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            candidates = path.rglob("*") if recursive else path.iterdir()
            files.extend(
                sorted(
                    p
                    for p in candidates
                    if p.is_file()
                    and p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith(".")
                )
            )
        elif path.is_file():
            files.append(path)
        else:
            missing.append(path)
    unique = list(dict.fromkeys(files))  # keep order, drop a file named twice
    return unique, missing


def output_stems(files: Sequence[Path]) -> list[str]:
    """An output name per file: its stem, made unique with -2, -3... when stems repeat."""
    used: dict[str, int] = {}
    stems = []
    for path in files:
        stem = path.stem
        count = used.get(stem, 0) + 1
        used[stem] = count
        stems.append(stem if count == 1 else f"{stem}-{count}")
    return stems


def format_seconds(seconds: float) -> str:
    """H:MM:SS or M:SS."""
    seconds = round(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """A one-line progress display on stderr: count, current file, elapsed time and ETA."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, clock=time.monotonic) -> None:
        self.total = total
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._line_open = False

    def eta(self) -> float | None:
        """Seconds left, from the mean time per finished file; None before the first one."""
        if self.done == 0:
            return None
        return (self.clock() - self.started) / self.done * (self.total - self.done)

    def line(self, position: int, name: str) -> str:
        """The progress text for file number `position` (1-based)."""
        eta = self.eta()
        eta_text = "ETA --:--" if eta is None else f"ETA {format_seconds(eta)}"
        return f"[{position}/{self.total}] {name}  elapsed {format_seconds(self.clock() - self.started)}  {eta_text}"

    def show(self, position: int, name: str) -> None:
        """Show the file being worked on."""
        text = self.line(position, name)
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
            self._line_open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish_one(self) -> None:
        """Count one more file as finished (parsed or failed)."""
        self.done += 1

    def message(self, text: str) -> None:
        """Print a line of its own, above the progress line."""
        if self._line_open:
            self.stream.write("\r\x1b[K")
            self._line_open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the progress line."""
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.flush()


def write_outputs(
    result: ParsingResult, outdir: Path, stem: str, source: str, palette: bool
) -> list[Path]:
    """Write STEM.labels.png, STEM.instances.png and STEM.json; returns their paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    labels = outdir / f"{stem}.labels.png"
    instances = outdir / f"{stem}.instances.png"
    summary = outdir / f"{stem}.json"
    labels.write_bytes(palette_png(result.label_map) if palette else grey_png(result.label_map))
    instances.write_bytes(grey_png(result.instance_map))
    document = {"source": source, **result.summary()}
    summary.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [labels, instances, summary]


def read_api_key(path: str | None) -> str | None:
    """The API key from --api-key-file, else $M2FP_API_KEY, else None."""
    if path:
        key = Path(path).read_text(encoding="utf-8").strip()
        if not key:
            raise ValueError(f"{path} is empty")
        return key
    return os.environ.get("M2FP_API_KEY") or None


UNTRAINED_NOTE = "the server runs an UNTRAINED model; results are meaningless"


def failure_line(name: str, error: M2FPError) -> str:
    """The one line printed for a file that failed."""
    return f"m2fp: FAILED {name}: {error.code}: {error.message}"


def run_parse(args: argparse.Namespace, client: Client, stream: TextIO = sys.stderr) -> int:
    """The `parse` command; returns the exit status."""
    files, missing = expand_inputs(args.inputs, recursive=args.recursive)
    for path in missing:
        stream.write(f"m2fp: FAILED {path}: not_found: no such file or directory\n")
    if not files:
        stream.write("m2fp: no .jpg/.jpeg/.png files to parse\n")
        return 1 if missing else 2
    outdir = Path(args.output)
    failed = len(missing) + parse_files(args, client, files, Progress(len(files), stream))
    total = len(files) + len(missing)
    stream.write(
        f"m2fp: {total - failed} of {total} parsed, {failed} failed; outputs in {outdir}\n"
    )
    return 1 if failed else 0


def parse_files(
    args: argparse.Namespace, client: Client, files: list[Path], progress: Progress
) -> int:
    """Parse each file in turn and write its outputs; returns how many failed or were not sent.

    A fatal error (bad API key, banned, ...) stops the run: the remaining files count as failed.
    """
    outdir, failed, warned_untrained = Path(args.output), 0, False
    for position, (path, stem) in enumerate(zip(files, output_stems(files), strict=True), start=1):
        progress.show(position, path.name)
        try:
            result = client.parse(path, poll_interval=args.poll_interval, timeout=args.timeout)
            write_outputs(result, outdir, stem, path.name, args.palette)
            if result.untrained and not warned_untrained:
                progress.message("m2fp: WARNING: " + (" ".join(result.warnings) or UNTRAINED_NOTE))
                warned_untrained = True
        except M2FPError as error:
            failed += 1
            progress.message(failure_line(path.name, error))
            if isinstance(error, FATAL_ERRORS):
                skipped = len(files) - position
                if skipped:
                    progress.message(f"m2fp: stopping: {skipped} remaining file(s) not sent")
                failed += skipped
                break
        except OSError as error:
            failed += 1
            progress.message(f"m2fp: FAILED {path.name}: read_error: {error.strerror or error}")
        finally:
            progress.finish_one()
    progress.close()
    return failed


def run_health(args: argparse.Namespace, client: Client, stream: TextIO = sys.stdout) -> int:
    """The `health` command: print /readyz; exit 0 when ready."""
    try:
        body = client.ready()
    except M2FPError as error:
        print(failure_line(client.server_url, error), file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2), file=stream)
    if body.get("untrained") or body.get("warnings"):
        print(
            "m2fp: WARNING: " + " ".join(body.get("warnings") or ["UNTRAINED model"]),
            file=sys.stderr,
        )
    return 0 if body.get("status") == "ready" else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `m2fp`: the `parse` and `health` commands."""
    parser = argparse.ArgumentParser(
        prog="m2fp", description="Client of the m2fp-serve human-parsing API."
    )
    common = common_options()
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parse_options(
        commands.add_parser("parse", parents=[common], help="parse photos and write label maps")
    )
    commands.add_parser("health", parents=[common], help="show whether the server is ready")
    return parser


def common_options() -> argparse.ArgumentParser:
    """Options every command takes: server, API key file, HTTP timeout."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=os.environ.get("M2FP_SERVER", DEFAULT_SERVER),
        help="server URL (default: $M2FP_SERVER or %(default)s)",
    )
    common.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="file holding the API key (default: $M2FP_API_KEY, if set)",
    )
    common.add_argument(
        "--http-timeout",
        type=float,
        default=30,
        metavar="S",
        help="seconds per HTTP request (default: %(default)s)",
    )
    return common


def add_parse_options(parse: argparse.ArgumentParser) -> None:
    """The `parse` command's inputs, output and polling options."""
    parse.add_argument(
        "inputs", nargs="+", metavar="PATH", help="photos (.jpg/.jpeg/.png) or directories"
    )
    parse.add_argument(
        "-o", "--output", default=".", metavar="OUTDIR", help="output directory (default: .)"
    )
    parse.add_argument(
        "--palette",
        action="store_true",
        help="write NAME.labels.png as a palette PNG (same class ids, shown in colour)",
    )
    parse.add_argument("-r", "--recursive", action="store_true", help="also look in subdirectories")
    parse.add_argument(
        "--timeout",
        type=float,
        default=300,
        metavar="S",
        help="give up on a photo after this many seconds (default: %(default)s)",
    )
    parse.add_argument(
        "--poll-interval",
        type=float,
        default=0.5,
        metavar="S",
        help="first status poll interval; it backs off to 5 s (default: %(default)s)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `m2fp` console script and `python -m m2fp_client`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        api_key = read_api_key(args.api_key_file)
        client = Client(args.server, api_key=api_key, timeout=args.http_timeout)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    with client:
        try:
            if args.command == "parse":
                return run_parse(args, client)
            return run_health(args, client)
        except KeyboardInterrupt:
            print("\nm2fp: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
