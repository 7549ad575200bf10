"""Load the official ModelScope M2FP checkpoints (`pytorch_model.pt`) safely and strictly into `M2FP`."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shared.constants import (
    CHECKPOINT_FILE,
    CONFIGURATION_FILE,
    ENCRYPTED_CHECKPOINT_FILE,
    RANDOM_WEIGHTS,
    UNTRAINED_WARNING,
)
from worker.m2fp.config import M2FPConfig, get_config
from worker.m2fp.model import M2FP, count_trainable_parameters

logger = logging.getLogger(__name__)

UNTRAINED_SEED = 0
MAX_CONFIGURATION_BYTES = 1 << 20  # configuration.json is small; refuse anything absurd


class CheckpointError(ValueError):
    """The checkpoint cannot be read, or does not match the model (the message names the first problem)."""


@dataclass(frozen=True)
class ModelInfo:
    """What `build_model` built.

    Attributes:
        variant: config name ("cihp", "lip", "tiny").
        source: the weights path, "random", or "<bytes>" for an in-memory state_dict.
        untrained: True when the weights are random (outputs are meaningless).
        device: device the model lives on.
        num_parameters: parameter elements (63,018,390 for the official variants).
        ignored_keys: checkpoint keys that were deliberately skipped (`criterion.*`, `*.num_batches_tracked`).
    """

    variant: str
    source: str
    untrained: bool
    device: str
    num_parameters: int
    ignored_keys: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """Plain-dict form for logs and health endpoints."""
        return asdict(self)


def resolve_checkpoint_path(path: str | os.PathLike[str], encrypted: bool = False) -> Path:
    """The checkpoint file for a bare file path or a ModelScope model directory.

    In a directory it is `pytorch_model.pt`, or `pytorch_model.pt.enc` when `encrypted` (sealed
    with `python -m worker.weights encrypt`). This is the one resolver of the checkpoint path.
    """
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / (ENCRYPTED_CHECKPOINT_FILE if encrypted else CHECKPOINT_FILE)
    if not candidate.is_file():
        raise CheckpointError(f"checkpoint file not found: {str(candidate)!r}")
    return candidate


def _unwrap_state_dict(loaded: object, source: str) -> dict[str, torch.Tensor]:
    """Take the flat state_dict out of a detectron2-style `{"model": state_dict}` or a bare state_dict."""
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"checkpoint {source} holds a {type(loaded).__name__}, not a state_dict"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {source} entry {key!r} is a {type(value).__name__}, expected a tensor under a str key"
            )
        state_dict[key] = value
    return state_dict


def _torch_load(file: str | os.PathLike[str] | io.BytesIO, source: str) -> dict[str, torch.Tensor]:
    """`torch.load` with `weights_only=True` (no arbitrary unpickling); every failure becomes CheckpointError."""
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, refused pickle global, truncated file, ...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"cannot load checkpoint {source}: {type(exc).__name__}: {first_line}"
        ) from exc
    return _unwrap_state_dict(loaded, source)


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read the state_dict of a checkpoint file or ModelScope model directory (tensors on the CPU)."""
    checkpoint_path = resolve_checkpoint_path(path)
    return _torch_load(checkpoint_path, repr(str(checkpoint_path)))


def load_state_dict_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Read a state_dict from checkpoint bytes held in memory (e.g. weights decrypted without touching disk)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CheckpointError(f"checkpoint data must be bytes, but got {type(data).__name__}")
    return _torch_load(io.BytesIO(bytes(data)), "<bytes>")


def read_model_configuration(model_dir: str | os.PathLike[str]) -> dict[str, object] | None:
    """The `model` section of `DIR/configuration.json`, or None when the file is absent."""
    configuration_path = Path(model_dir) / CONFIGURATION_FILE
    if not configuration_path.is_file():
        return None
    if configuration_path.stat().st_size > MAX_CONFIGURATION_BYTES:
        raise CheckpointError(
            f"{str(configuration_path)!r} is larger than {MAX_CONFIGURATION_BYTES} bytes"
        )
    try:
        configuration = json.loads(configuration_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {str(configuration_path)!r}: {exc}") from exc
    model_section = configuration.get("model") if isinstance(configuration, dict) else None
    return model_section if isinstance(model_section, dict) else {}


def check_model_configuration(model_section: Mapping[str, object], config: M2FPConfig) -> None:
    """Raise CheckpointError when a ModelScope `model` config section contradicts `config`."""
    decoder = model_section.get("decoder")
    decoder_num_classes = decoder.get("num_classes") if isinstance(decoder, dict) else None
    checks = [
        ("single_human", model_section.get("single_human"), config.single_human, bool),
        ("num_parsing", model_section.get("num_parsing"), config.num_parsing, int),
        ("decoder.num_classes", decoder_num_classes, config.num_classes, int),
    ]
    for name, found, expected, kind in checks:
        if isinstance(found, kind) and found != expected:
            raise CheckpointError(
                f"configuration.json says model.{name}={found!r} but the {config.name!r} variant has {expected!r}"
            )


def _is_ignorable_extra(key: str) -> bool:
    """Keys an official checkpoint may carry that this model deliberately has no slot for."""
    return key.startswith("criterion.") or key.endswith(".num_batches_tracked")


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """Copy a checkpoint into `model`, requiring every key and shape to match.

    Missing `*.num_batches_tracked` and extra `criterion.*` / `*.num_batches_tracked` keys are tolerated.
    Any other missing key, unexpected key, shape mismatch, non-float tensor or non-finite value raises
    CheckpointError naming the first problem (model keys in module order, then unexpected checkpoint keys).

    Returns:
        The checkpoint keys that were ignored.
    """
    expected = model.state_dict()
    problems: list[str] = []
    for key, target in expected.items():
        if key not in state_dict:
            if not key.endswith(".num_batches_tracked"):
                problems.append(f"missing key {key!r} (model shape {tuple(target.shape)})")
            continue
        tensor = state_dict[key]
        if tuple(tensor.shape) != tuple(target.shape):
            problems.append(
                f"shape mismatch for {key!r}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}"
            )
        elif target.is_floating_point() and not tensor.is_floating_point():
            problems.append(
                f"dtype mismatch for {key!r}: checkpoint {tensor.dtype} vs model {target.dtype}"
            )
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            problems.append(f"non-finite values in {key!r}")
    ignored = []
    for key, tensor in state_dict.items():
        if key in expected:
            continue
        if _is_ignorable_extra(key):
            ignored.append(key)
        else:
            problems.append(f"unexpected key {key!r} (checkpoint shape {tuple(tensor.shape)})")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint does not match the model: {problems[0]}{more}")

    incompatible = model.load_state_dict(
        {key: state_dict[key] for key in expected if key in state_dict}, strict=False
    )
    missing = [key for key in incompatible.missing_keys if not key.endswith(".num_batches_tracked")]
    if missing or incompatible.unexpected_keys:
        raise CheckpointError(
            f"checkpoint did not load cleanly: missing {missing}, unexpected {incompatible.unexpected_keys}"
        )
    return tuple(ignored)


def build_untrained_model(config: M2FPConfig, seed: int = UNTRAINED_SEED) -> M2FP:
    """An `M2FP` with deterministic random initial weights (global RNG state left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return M2FP(config)


def model_info(
    model: M2FP, source: str, ignored: tuple[str, ...], untrained: bool = False
) -> ModelInfo:
    """The `ModelInfo` of a built model (on its device) from `source`, with the keys skipped."""
    return ModelInfo(
        variant=model.config.name,
        source=source,
        untrained=untrained,
        device=str(model.pixel_mean.device),
        num_parameters=count_trainable_parameters(model),
        ignored_keys=ignored,
    )


def _finish(model: M2FP, device: str | torch.device) -> M2FP:
    """Move to the device and switch to inference mode (eval, no gradients)."""
    model.to(torch.device(device))
    model.eval()
    model.requires_grad_(False)
    return model


def build_model_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    variant: str = "cihp",
    device: str | torch.device = "cpu",
    source: str = "<bytes>",
) -> tuple[M2FP, ModelInfo]:
    """Build the `variant` model and load an in-memory state_dict into it (strict, see `load_into`)."""
    config = get_config(variant)
    model = M2FP(config)
    ignored = load_into(model, state_dict)
    return _finish(model, device), model_info(model, source, ignored)


def build_untrained(variant: str, device: str | torch.device) -> tuple[M2FP, ModelInfo]:
    """The explicitly untrained model of `weights="random"`, announced with a WARNING."""
    config = get_config(variant)
    logger.warning(
        "%s (building the %s model, seed %d; never use this outside tests and demos)",
        UNTRAINED_WARNING,
        config.name,
        UNTRAINED_SEED,
    )
    model = _finish(build_untrained_model(config), device)
    return model, model_info(model, RANDOM_WEIGHTS, (), untrained=True)


def build_model(
    weights: str | os.PathLike[str],
    variant: str = "cihp",
    device: str | torch.device = "cpu",
    *,
    data: bytes | None = None,
) -> tuple[M2FP, ModelInfo]:
    """Build an inference-ready M2FP: the one way the service, the CLI and the tests load weights.

    Args:
        weights: a checkpoint file, a ModelScope model directory (`pytorch_model.pt`, optional
            `configuration.json`, which must agree with `variant`), or "random" for an explicitly
            untrained model (deterministic seed; logged as a WARNING; `info.untrained` is True).
        variant: "cihp" (multi-human), "lip" (single-human) or "tiny" (tests only).
        device: torch device for the model.
        data: the checkpoint's bytes when the caller already read them (the worker decrypts and
            checks the digest in memory first); `weights` still names where they came from, and
            its `configuration.json` is still checked.

    Returns:
        The model (eval mode, no gradients) and a `ModelInfo`.
    """
    config = get_config(variant)
    if isinstance(weights, str) and weights == RANDOM_WEIGHTS:
        if data is not None:
            raise CheckpointError("weights='random' takes no checkpoint data")
        return build_untrained(config.name, device)
    if Path(weights).is_dir():
        model_section = read_model_configuration(weights)
        if model_section is not None:
            check_model_configuration(model_section, config)
    if data is None:
        source = resolve_checkpoint_path(weights)
        state_dict = load_state_dict_file(source)
    else:
        source = Path(weights)
        state_dict = load_state_dict_bytes(data)
    model, info = build_model_from_state_dict(state_dict, config.name, device, source=str(source))
    del state_dict
    logger.info(
        "loaded M2FP %s weights from %s (%d ignored keys)",
        config.name,
        source,
        len(info.ignored_keys),
    )
    return model, info
