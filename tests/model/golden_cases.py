"""The golden cases of tests/data/golden and how the model tests compare with them (plain code).

Shared by test_m2fp_golden_net.py (the network against ModelScope's), test_ms_deform_attn_op.py
(the compiled op on the same cases) and test_m2fp_pipeline_golden.py (the whole pipeline).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from worker.m2fp.model import M2FPOutput

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
GOLDEN_DIR = DATA_DIR / "golden"
# Golden README section 4: max|a - b| <= 3e-5 * max(1, max|b|) for a float32 CPU port.
REL_TOLERANCE = 3e-5
NET_CASES = [
    ("cihp_net_96x128", "cihp"),
    ("cihp_net_100x75", "cihp"),
    ("lip_net_96x128", "lip"),
]


def keys_file(variant: str) -> Path:
    """The state_dict key listing of a variant."""
    return DATA_DIR / f"state_dict_keys_{variant}.txt"


def load_case(name: str) -> dict[str, np.ndarray]:
    """All arrays of a golden case."""
    with np.load(GOLDEN_DIR / f"{name}.npz") as archive:
        return {key: archive[key] for key in archive.files}


def flatten_outputs(output: M2FPOutput) -> dict[str, np.ndarray]:
    """Port outputs under the golden array names."""
    arrays = {"pred_logits": output.pred_logits, "pred_masks": output.pred_masks}
    if output.aux_pred_logits is not None:
        arrays["aux_pred_logits"] = torch.stack(output.aux_pred_logits)  # (9, B, Q, C+1)
        arrays["aux_pred_masks"] = torch.stack(output.aux_pred_masks)  # (9, B, Q, H/4, W/4)
        arrays["mask_features"] = output.mask_features
        for name, features in output.backbone_features.items():
            arrays[f"backbone_{name}"] = features
        for level, features in enumerate(output.multi_scale_features):
            arrays[f"multi_scale_{level}"] = features
    return {name: tensor.detach().cpu().numpy() for name, tensor in arrays.items()}


def compare_with_golden(
    case: str,
    arrays: dict[str, np.ndarray],
    ported: dict[str, np.ndarray],
    rel_tolerance: float,
    report: dict,
) -> list[str]:
    """Record max|a - b| of every golden float array and return the ones beyond rel_tolerance * max(1, max|b|)."""
    compared = [
        name
        for name, value in arrays.items()
        if value.dtype == np.float32 and name != "model_input"
    ]
    assert {"pred_logits", "pred_masks"} <= set(compared)
    if case.startswith("cihp_net_96x128"):
        assert (
            len(compared) == 12
        )  # final outputs, 4 backbone maps, mask features, 3 scales, aux logits/masks
    failures = []
    for name in compared:
        golden = arrays[name]
        assert ported[name].shape == golden.shape, (
            f"{case}/{name}: shape {ported[name].shape} vs {golden.shape}"
        )
        max_abs_diff = float(np.abs(ported[name] - golden).max())
        golden_max_abs = float(np.abs(golden).max())
        limit = rel_tolerance * max(1.0, golden_max_abs)
        report.setdefault(case, {})[name] = {
            "max_abs_diff": max_abs_diff,
            "golden_max_abs": golden_max_abs,
            "limit": limit,
        }
        if not max_abs_diff <= limit:
            failures.append(f"{name}: max|a-b|={max_abs_diff:.3e} > {limit:.3e}")
    return failures
