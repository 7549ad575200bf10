"""A second synthetic CIHP checkpoint whose label maps show many classes (the precision tests' proxy).

The golden weights (tests/golden_weights.py) give label maps of one or two classes: every query of
the decoder ends up alike (the cross-attention's output, the same for all of them, swamps the
queries after each post-norm), one class holds most of the probability mass, and each query's mask
is "on" nearly everywhere. A label-map agreement measured on them says little. The recipe here
starts from the golden recipe with its own seed and changes four things, deterministically:

1. the decoder's attention output projections (cross and self) scaled by 0.02, so that each query
   keeps its own identity and the queries' classes differ;
2. `pixel_decoder.mask_features.bias` set so that every query's mask logits average zero on a
   fixed calibration image (seeded noise-and-gradient, 128x160, not a test photo): least squares
   over the queries' mask embeddings, so each mask is "on" in some places and "off" in others;
3. `class_embed.bias` shifted by minus each class's mean logit over the queries on that image, so
   the probability mass is spread over the classes;
4. the mask head's last layer scaled by 4, so that masks are sharp.

On the synthetic photo (bench/model_bench.py's, the most photo-like input the repository has:
no photo of a person is stored or can be downloaded) its label maps show 14 classes at 320x427.
These are still random weights: the winning class of a pixel often leads by a small margin,
where the official checkpoint is confident, so agreement figures measured on them are a
pessimistic proxy for the official checkpoint's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from tests.golden_weights import golden_state_dict
from worker.m2fp.config import M2FPConfig, get_config

DIVERSE_SEED = 4321
ATTENTION_OUT_SCALE = 0.02
MASK_HEAD_SCALE = 4.0
CALIBRATION_SIZE = (128, 160)
CALIBRATION_SEED = 7
HEAD = "sem_seg_head.predictor."
MASK_FEATURES_BIAS = "sem_seg_head.pixel_decoder.mask_features.bias"


def calibration_image(height: int, width: int, seed: int) -> np.ndarray:
    """Colour gradients plus seeded noise (uint8 RGB): smooth regions with edges."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:height, 0:width]
    base = np.stack(
        [columns * 255 // width, rows * 255 // height, (rows + columns) * 255 // (height + width)],
        -1,
    )
    return np.clip(base + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def config_at(height: int, width: int, variant: str = "cihp") -> M2FPConfig:
    """The variant's config with the multi-human resize set to keep an image of this size as is."""
    return dataclasses.replace(
        get_config(variant), min_size_test=min(height, width), max_size_test=max(height, width)
    )


def _calibration_outputs(state_dict: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Final mask embeddings (Q, D), mask logits' means (Q,) and class logits (Q, C+1)."""
    from worker.m2fp.checkpoint import load_into
    from worker.m2fp.model import M2FP
    from worker.m2fp.predictor import Predictor

    height, width = CALIBRATION_SIZE
    model = M2FP(config_at(height, width))
    load_into(model, state_dict)
    captured: dict[str, torch.Tensor] = {}
    hook = model.sem_seg_head.predictor.mask_embed.register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("embeddings", output)
    )
    predictor = Predictor(model.eval(), max_side=width, precision_mode="fp32")
    inference = predictor.infer(calibration_image(height, width, CALIBRATION_SEED))
    hook.remove()
    return captured["embeddings"][0], inference.pred_masks.mean((1, 2)), inference.pred_logits


def diverse_state_dict(config: M2FPConfig | None = None) -> dict[str, torch.Tensor]:
    """The diverse CIHP checkpoint (see the module docstring); `config` is ignored (CIHP only)."""
    del config
    state = golden_state_dict(get_config("cihp"), seed=DIVERSE_SEED)
    for key in state:
        if key.startswith(HEAD) and key.endswith("attn.out_proj.weight"):
            state[key] = state[key] * ATTENTION_OUT_SCALE
    embeddings, mask_means, class_logits = _calibration_outputs(state)
    shift = torch.linalg.lstsq(embeddings, -mask_means[:, None]).solution[:, 0]
    state[MASK_FEATURES_BIAS] = state[MASK_FEATURES_BIAS] + shift
    state[HEAD + "class_embed.bias"] = (
        state[HEAD + "class_embed.bias"] - class_logits.mean(0) + class_logits.mean()
    )
    for name in ("weight", "bias"):
        key = f"{HEAD}mask_embed.layers.2.{name}"
        state[key] = state[key] * MASK_HEAD_SCALE
    return state
