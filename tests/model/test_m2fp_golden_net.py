"""Parity of the M2FP port with ModelScope's own M2FP class on the golden network cases."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.golden_weights import golden_state_dict, state_dict_sha256
from worker.m2fp.checkpoint import load_into
from worker.m2fp.config import M2FPConfig, get_config
from worker.m2fp.model import M2FP, M2FPOutput

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
GOLDEN_DIR = DATA_DIR / "golden"
REL_TOLERANCE = (
    3e-5  # golden README section 4: max|a - b| <= 3e-5 * max(1, max|b|) for a float32 CPU port
)

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


@pytest.fixture(scope="module")
def diff_report(tmp_path_factory: pytest.TempPathFactory):
    """Collects the measured max abs differences; printed (-s) and written as JSON at module teardown."""
    report: dict[str, dict[str, dict[str, float]]] = {}
    yield report
    path = tmp_path_factory.getbasetemp() / "m2fp_golden_diffs.json"
    path.write_text(json.dumps(report, indent=1, sort_keys=True))
    print(f"\nM2FP golden max |a-b| (written to {path}):")
    for case, arrays in sorted(report.items()):
        for name, stats in sorted(arrays.items()):
            print(
                f"  {case:16s} {name:16s} max_abs_diff={stats['max_abs_diff']:.3e} "
                f"golden_max_abs={stats['golden_max_abs']:.3g} limit={stats['limit']:.3e}"
            )


@pytest.fixture(scope="module")
def golden_model() -> Callable[[str], M2FP]:
    """Builds each variant's full-size model with the golden weights once per module."""
    models: dict[str, M2FP] = {}

    def get(variant: str) -> M2FP:
        if variant not in models:
            config: M2FPConfig = get_config(variant)
            model = M2FP(config)
            load_into(model, golden_state_dict(keys_file=keys_file(variant)))
            models[variant] = model.eval()
        return models[variant]

    return get


@pytest.mark.parametrize("variant", ["cihp", "lip"])
def test_golden_weight_recipe_matches_manifest(variant: str) -> None:
    manifest = json.loads((GOLDEN_DIR / "weights_manifest.json").read_text())[variant]
    state_dict = golden_state_dict(keys_file=keys_file(variant))
    assert len(state_dict) == manifest["num_keys"] == 822
    if state_dict_sha256(state_dict) != manifest["total_sha256"]:
        differing = [
            key
            for key, tensor in state_dict.items()
            if hashlib.sha256(tensor.numpy().astype("<f4").tobytes()).hexdigest()
            != manifest["keys"][key]["sha256"]
        ]
        pytest.fail(
            f"{variant} golden weights differ from the manifest, first keys: {differing[:5]}"
        )


def test_golden_weight_recipe_from_config_equals_keys_file() -> None:
    from_config = golden_state_dict(get_config("lip"))
    from_file = golden_state_dict(keys_file=keys_file("lip"))
    assert list(from_config) == list(from_file)
    assert state_dict_sha256(from_config) == state_dict_sha256(from_file)


@pytest.mark.parametrize(("case", "variant"), NET_CASES)
def test_normalize_and_pad_reproduces_model_input(case: str, variant: str, golden_model) -> None:
    arrays = load_case(case)
    image = torch.from_numpy(arrays["image"]).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    padded, image_sizes = golden_model(variant).normalize_and_pad(image.unsqueeze(0))
    assert padded.dtype == torch.float32
    assert tuple(padded.shape) == arrays["model_input"].shape
    assert image_sizes == [tuple(int(size) for size in arrays["image_size"])]
    np.testing.assert_allclose(padded.numpy(), arrays["model_input"], rtol=0, atol=1e-6)


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


@pytest.mark.parametrize(("case", "variant"), NET_CASES)
def test_network_matches_golden(case: str, variant: str, golden_model, diff_report) -> None:
    arrays = load_case(case)
    with_intermediates = "aux_pred_logits" in arrays
    with torch.inference_mode():
        output = golden_model(variant)(
            torch.from_numpy(arrays["model_input"]), return_intermediates=with_intermediates
        )
    failures = compare_with_golden(
        case, arrays, flatten_outputs(output), REL_TOLERANCE, diff_report
    )
    assert not failures, f"{case}: " + "; ".join(failures)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_network_matches_golden_on_cuda(golden_model, diff_report) -> None:
    """Same case on the GPU in float32 with TF32 off (README section 4: 1e-4 relative)."""
    arrays = load_case("cihp_net_96x128")
    model = copy.deepcopy(golden_model("cihp")).to("cuda")
    saved_flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            output = model(
                torch.from_numpy(arrays["model_input"]).cuda(), return_intermediates=True
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_flags
    failures = compare_with_golden(
        "cihp_net_96x128@cuda", arrays, flatten_outputs(output), 1e-4, diff_report
    )
    assert not failures, "cihp_net_96x128 on cuda: " + "; ".join(failures)
