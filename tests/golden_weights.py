"""Deterministic synthetic weights of the golden parity data (tests/data/golden, README section 1)."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from worker.m2fp.config import M2FPConfig

GOLDEN_SEED = 1234
SEED_STRIDE = 100003

UNIT_EMBEDDINGS = frozenset(
    {
        "sem_seg_head.pixel_decoder.transformer.level_embed",
        "sem_seg_head.predictor.level_embed.weight",
        "sem_seg_head.predictor.query_embed.weight",
        "sem_seg_head.predictor.query_feat.weight",
    }
)
DECODER_BRANCH_OUT = re.compile(
    r"^sem_seg_head\.predictor\.("
    r"transformer_self_attention_layers\.\d+\.self_attn\.out_proj\.weight|"
    r"transformer_cross_attention_layers\.\d+\.multihead_attn\.out_proj\.weight|"
    r"transformer_ffn_layers\.\d+\.linear2\.weight)$"
)
CLASS_EMBED = "sem_seg_head.predictor.class_embed.weight"


def read_keys_file(keys_file: str | Path) -> list[tuple[str, tuple[int, ...], str]]:
    """Parse a `key<TAB>shape<TAB>dtype` listing into (key, shape, dtype) tuples, in file order."""
    entries = []
    for line_number, line in enumerate(Path(keys_file).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(
                f"{keys_file}:{line_number}: expected key<TAB>shape<TAB>dtype, but got {line!r}"
            )
        key, shape_text, dtype = parts
        shape_text = shape_text.strip().strip("()")
        shape = tuple(int(size) for size in shape_text.split(",") if size.strip())
        entries.append((key, shape, dtype.strip()))
    return entries


def _float_key_shapes(
    config: M2FPConfig | None, keys_file: str | Path | None
) -> dict[str, tuple[int, ...]]:
    """The floating-point state_dict keys and shapes, from a keys file or from the model built on `meta`."""
    if keys_file is not None:
        return {
            key: shape
            for key, shape, dtype in read_keys_file(keys_file)
            if dtype.startswith("float")
        }
    if config is None:
        raise ValueError("golden_state_dict needs a config or a keys_file, but got neither")
    from worker.m2fp.model import M2FP  # local import: model imports nothing from here

    with torch.device("meta"):
        model = M2FP(config)
    return {
        key: tuple(tensor.shape)
        for key, tensor in model.state_dict().items()
        if tensor.is_floating_point()
    }


def golden_tensor(
    key: str, shape: tuple[int, ...], index: int, seed: int = GOLDEN_SEED
) -> torch.Tensor:
    """The recipe's tensor for `key`, the `index`-th float key in sorted order."""
    generator = torch.Generator().manual_seed(seed * SEED_STRIDE + index)
    dtype = torch.float32
    if key.endswith(".running_var"):
        return 0.5 + torch.rand(shape, generator=generator, dtype=dtype)
    if key.endswith(".running_mean"):
        return 0.1 * torch.randn(shape, generator=generator, dtype=dtype)
    if key in UNIT_EMBEDDINGS:
        return torch.randn(shape, generator=generator, dtype=dtype)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        gain = 0.25 if DECODER_BRANCH_OUT.match(key) else 3.0 if key == CLASS_EMBED else 1.0
        return torch.randn(shape, generator=generator, dtype=dtype) * (gain / math.sqrt(fan_in))
    if key.endswith(".weight"):  # every 1-D weight is a norm scale
        return 1.0 + 0.1 * torch.randn(shape, generator=generator, dtype=dtype)
    return 0.1 * torch.randn(shape, generator=generator, dtype=dtype)


def golden_state_dict(
    config: M2FPConfig | None = None, keys_file: str | Path | None = None, seed: int = GOLDEN_SEED
) -> dict[str, torch.Tensor]:
    """Build the golden weights: every float key, sorted by code point, drawn from its own seeded generator.

    Args:
        config: the model config whose state_dict keys to use (ignored when `keys_file` is given).
        keys_file: a `state_dict_keys_*.txt` listing (key, shape, dtype); int keys are skipped.
        seed: SEED of the recipe.

    Returns:
        key -> float32 tensor, in sorted key order (no `num_batches_tracked`).
    """
    key_shapes = _float_key_shapes(config, keys_file)
    return {
        key: golden_tensor(key, key_shapes[key], index, seed)
        for index, key in enumerate(sorted(key_shapes))
    }


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over `key + NUL + little-endian float32 bytes` of every float tensor, keys sorted."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        if not tensor.is_floating_point():
            continue
        digest.update(key.encode() + b"\0")
        digest.update(tensor.detach().cpu().contiguous().numpy().astype("<f4").tobytes())
    return digest.hexdigest()
