"""Parity of the M2FP port with ModelScope's own M2FP class on the golden network cases."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable

import numpy as np
import pytest
import torch

from tests.golden_weights import golden_state_dict, state_dict_sha256
from tests.model.golden_cases import (
    GOLDEN_DIR,
    NET_CASES,
    REL_TOLERANCE,
    compare_with_golden,
    flatten_outputs,
    keys_file,
    load_case,
)
from worker.m2fp.checkpoint import load_into
from worker.m2fp.config import M2FPConfig, get_config
from worker.m2fp.model import M2FP


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
