"""Model weights at rest: encryption, the SHA-256 pin, and building the worker's Predictor.

- `python -m worker.weights new-key > weights.key` makes a 256-bit key file (base64).
- `python -m worker.weights encrypt --key-file weights.key IN OUT` seals a checkpoint with
  AES-256-GCM (shared.crypto's format, associated data `m2fp:weights`) and prints the plaintext's
  SHA-256 to pin with `M2FP_WEIGHTS_SHA256`.
- `python -m worker.weights sha256 PATH` prints the SHA-256 of a plaintext checkpoint.

`settings_predictor(settings, device)` is what a worker calls (`load_predictor` with what the
settings say): it reads the checkpoint bytes, decrypts them in memory when
`M2FP_WEIGHTS_KEY_FILE` is set (the plaintext never touches disk), checks the pinned digest
before unpickling anything, and hands the bytes to `Predictor.from_weights`, i.e. to the same
`worker.m2fp.checkpoint.build_model` the offline CLI uses (`configuration.json` check included;
`torch.load(..., weights_only=True)` then reads from memory). Any mismatch is a clear error.
torch is imported only inside the functions that need it: the worker's parent process never
imports it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import sys
from pathlib import Path

from shared.config import resolve_weights
from shared.constants import RANDOM_WEIGHTS
from shared.crypto import KEY_BYTES, generate_key, open_sealed, seal
from shared.errors import DecryptionError

WEIGHTS_AAD = b"m2fp:weights"


class WeightsError(RuntimeError):
    """The checkpoint is missing, cannot be decrypted, or does not match its pinned digest."""


def read_key_file(path: str | Path) -> bytes:
    """A 32-byte key from a file holding its base64 text."""
    try:
        key = base64.b64decode(Path(path).read_text().strip(), validate=True)
    except OSError as exc:
        raise WeightsError(f"weights key file {path} cannot be read: {exc.strerror}") from exc
    except (binascii.Error, ValueError) as exc:
        raise WeightsError(f"weights key file {path} is not base64") from exc
    if len(key) != KEY_BYTES:
        raise WeightsError(f"weights key must be {KEY_BYTES} bytes, got {len(key)}")
    return key


def checkpoint_file(weights: str | Path, encrypted: bool) -> Path:
    """The file behind `weights` (`worker.m2fp.checkpoint.resolve_checkpoint_path`), or WeightsError."""
    from worker.m2fp.checkpoint import CheckpointError, resolve_checkpoint_path

    try:
        return resolve_checkpoint_path(weights, encrypted=encrypted)
    except CheckpointError as exc:
        raise WeightsError(f"no checkpoint: {exc}") from exc


def read_checkpoint(
    weights: str | Path, *, sha256: str | None = None, key_file: str | None = None
) -> bytes:
    """The plaintext checkpoint bytes: decrypted in memory if a key is given, digest checked."""
    data = checkpoint_file(weights, encrypted=key_file is not None).read_bytes()
    if key_file is not None:
        try:
            data = open_sealed(read_key_file(key_file), data, WEIGHTS_AAD)
        except DecryptionError as exc:
            raise WeightsError(
                "the checkpoint cannot be decrypted with M2FP_WEIGHTS_KEY_FILE "
                "(wrong key, or not a file made by `python -m worker.weights encrypt`)"
            ) from exc
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256.lower():
            raise WeightsError(
                f"checkpoint SHA-256 mismatch: expected M2FP_WEIGHTS_SHA256={sha256}, "
                f"got {digest}; refusing to load it"
            )
    return data


def load_predictor(
    weights: str,
    *,
    variant: str,
    device: str,
    max_side: int,
    sha256: str | None = None,
    key_file: str | None = None,
    deform_attn: str | None = None,
    precision_mode: str | None = None,
    winograd: str | None = None,
):
    """Build the worker's Predictor from settings-level inputs (imports torch: children only)."""
    from worker.m2fp.predictor import Predictor

    data = None
    if weights == RANDOM_WEIGHTS:
        if sha256 or key_file:
            raise WeightsError(
                "M2FP_WEIGHTS=random cannot be combined with a digest pin or a weights key"
            )
    else:
        data = read_checkpoint(weights, sha256=sha256, key_file=key_file)
    return Predictor.from_weights(
        weights,
        variant=variant,
        device=device,
        max_side=max_side,
        deform_attn=deform_attn,
        data=data,
        precision_mode=precision_mode,
        use_winograd=None if winograd is None else winograd == "auto",
    )


def settings_predictor(settings, device: str, weights: str | None = None):
    """`load_predictor` with everything the worker's settings say (`weights`: the resolved
    checkpoint path, else `resolve_weights(settings)`)."""
    return load_predictor(
        weights or resolve_weights(settings),
        variant=settings.variant,
        device=device,
        max_side=settings.infer_max_side,
        sha256=settings.weights_sha256,
        key_file=settings.weights_key_file,
        deform_attn=settings.deform_attn,
        precision_mode=settings.precision,
        winograd=settings.winograd,
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: new-key, encrypt, sha256."""
    parser = argparse.ArgumentParser(
        prog="python -m worker.weights", description="M2FP weights at rest"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("new-key", help="print a new base64 key for M2FP_WEIGHTS_KEY_FILE")
    enc = sub.add_parser("encrypt", help="encrypt a checkpoint; prints the plaintext SHA-256")
    enc.add_argument("--key-file", required=True)
    enc.add_argument("source")
    enc.add_argument("destination")
    digest = sub.add_parser(
        "sha256", help="SHA-256 of a plaintext checkpoint (for M2FP_WEIGHTS_SHA256)"
    )
    digest.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "new-key":
            print(generate_key())
        elif args.command == "encrypt":
            plaintext = checkpoint_file(args.source, encrypted=False).read_bytes()
            Path(args.destination).write_bytes(
                seal(read_key_file(args.key_file), plaintext, WEIGHTS_AAD)
            )
            print(hashlib.sha256(plaintext).hexdigest())
        else:
            print(
                hashlib.sha256(checkpoint_file(args.path, encrypted=False).read_bytes()).hexdigest()
            )
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
