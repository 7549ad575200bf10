"""The one inference interface of the worker: `Predictor(model).predict(rgb_image) -> ParsingResult`.

`Predictor(model)` wraps a built model; `Predictor.from_weights(weights)` builds it first through
`worker.m2fp.checkpoint.build_model` (the one loader of the service, the CLI and the tests); `predict` takes a decoded RGB uint8 image (H, W, 3) and returns plain
NumPy arrays and dicts at the input size: a class-id label map, a person-index instance map, the persons
with their parts, and the kept part instances (see `worker.m2fp.postprocess` for the readout and
`worker.m2fp.persons` for the grouping). Images whose
longer side exceeds `max_side` are shrunk first (OpenCV INTER_AREA, aspect kept), parsed at that size, and
the maps are scaled back with nearest-neighbour sampling.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import cv2
import numpy as np
import torch
from torch import nn

from worker.m2fp import allocator, dense, fusion, ops, precision, winograd
from worker.m2fp.checkpoint import build_model
from worker.m2fp.cpu import cpu_features
from worker.m2fp.model import M2FP
from worker.m2fp.persons import describe_persons, scale_box
from worker.m2fp.postprocess import (
    MultiHumanParsing,
    SingleHumanParsing,
    parse_multi_human,
    parse_single_human,
)
from worker.m2fp.preprocess import PreprocessedImage, check_rgb_image, preprocess_image

logger = logging.getLogger(__name__)


@dataclass
class ParsingResult:
    """Parsing of one image, at the size of the image given to `Predictor.predict`.

    Attributes:
        label_map: (H, W) uint8 class id per pixel (0..19, see `Predictor.class_names`).
        instance_map: (H, W) uint8 person index per pixel, 0 = no person.
        persons: one dict per person: index, score, box [x0, y0, x1, y1] (x1, y1 exclusive), area,
            parts [{class_id, name, area}].
        parts: the kept part instances: class_id, name, score, person (index or 0), area, box.
        timings: seconds spent in "preprocess", "forward" and "postprocess".
    """

    label_map: np.ndarray
    instance_map: np.ndarray
    persons: list[dict]
    parts: list[dict]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def classes_present(self) -> list[int]:
        """Class ids that occur in `label_map`, ascending."""
        return [
            int(class_id)
            for class_id in np.flatnonzero(np.bincount(self.label_map.ravel(), minlength=1))
        ]


@dataclass
class Inference:
    """Intermediate results of one image at the working size (for tests and diagnostics).

    Attributes:
        preprocessed: the network-ready image and what is needed to map back.
        padded_size: (Hp, Wp) of the padded network input.
        image_size: (h, w) of the unpadded network input.
        pred_logits: (Q, C+1) class logits.
        pred_masks: (Q, Hp/4, Wp/4) mask logits.
        parsing: the variant's postprocessing result at the working size.
        timings: seconds per stage.
    """

    preprocessed: PreprocessedImage
    padded_size: tuple[int, int]
    image_size: tuple[int, int]
    pred_logits: torch.Tensor
    pred_masks: torch.Tensor
    parsing: MultiHumanParsing | SingleHumanParsing
    timings: dict[str, float]


def downsize_to_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink an image (INTER_AREA, aspect kept) so that its longer side is at most `max_side`."""
    height, width = image.shape[:2]
    longer = max(height, width)
    if longer <= max_side:
        return image
    scale = max_side / longer
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    return cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_AREA)


def upscale_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a (h, w) map to (height, width), sampling at pixel centres."""
    source_height, source_width = array.shape
    rows = np.minimum(
        ((np.arange(height) + 0.5) * source_height / height).astype(np.int64), source_height - 1
    )
    columns = np.minimum(
        ((np.arange(width) + 0.5) * source_width / width).astype(np.int64), source_width - 1
    )
    return array[rows[:, None], columns[None, :]]  # (height, width)


class Predictor:
    """Loads an M2FP model once and parses RGB images (multi-human CIHP or single-human LIP variant).

    `deform_attn` (`auto`, `op` or `reference`; default: M2FP_DEFORM_ATTN through `shared.config`) picks
    the deformable-attention path (`worker.m2fp.ops`); `self.deform_attn` says which one runs.
    `precision_mode` (`auto`, `fp32`, `bf16` or `int8`; default: M2FP_PRECISION) picks the arithmetic
    (`worker.m2fp.precision`); `self.precision` says which one runs, `self.precision_choice` why.
    `fuse_backbone` (default: where it applies) runs the backbone as `worker.m2fp.fusion.FusedBackbone`
    (batch norms folded, oneDNN conv + ReLU / + residual, channels-last) on CPU at every precision;
    `self.backbone_path` says which backbone runs; with it, in fp32, bf16x3 and bf16, the encoder's
    FFNs run as oneDNN linears with the ReLU as a post-op (`self.encoder_path`: "fused FFN" or "as
    built"), and on CPU in those precisions every `nn.Linear` runs through oneDNN
    (`self.dense_path`: "oneDNN" or "as built";
    `worker.m2fp.dense`). With the fused backbone, the 3x3 convolutions that pay on this CPU
    (`worker.m2fp.winograd.plan_for` its flags) run as Winograd F(4x4, 3x3) or F(2x2, 3x3) where
    the compiled transforms load (`self.winograd_path`: "F(4x4, 3x3) for N, F(2x2, 3x3) for M
    convolutions (avx2 plan)" or "off: <why>"); `use_winograd` (default: M2FP_WINOGRAD) False runs
    them direct. In bf16x3 (what `auto` picks on a CPU with AMX-BF16) the linears, the backbone's
    1x1 and direct 3x3 convolutions and the F(2x2) Winograd products run as three bf16 AMX products
    (`worker.m2fp.amx`; `self.amx_path`: "bf16x3 for N linears, ..." or "off: precision fp32").
    The caller's `model` is not modified. On CPU the process's malloc is tuned once
    (`worker.m2fp.allocator`); `self.allocator` says how.
    """

    def __init__(
        self,
        model: M2FP,
        *,
        untrained: bool = False,
        max_side: int = 1920,
        deform_attn: str | None = None,
        precision_mode: str | None = None,
        fuse_backbone: bool | None = None,
        use_winograd: bool | None = None,
    ) -> None:
        if max_side < 32:
            raise ValueError(f"max_side must be >= 32, but got {max_side}")
        if deform_attn is None:  # M2FP_DEFORM_ATTN, read where all settings are read
            from shared.config import deform_attn_mode

            deform_attn = deform_attn_mode()
        # Process-wide; raises for "op" when the op cannot be loaded.
        path = ops.configure(deform_attn)
        device = str(model.pixel_mean.device)
        on_cpu = device.startswith("cpu")
        if not on_cpu:
            path = "reference: the compiled op is CPU-only"
        self.deform_attn = path  # "op" or "reference: <reason>"
        if precision_mode is None:  # M2FP_PRECISION, read where all settings are read
            from shared.config import precision_mode as configured_precision

            precision_mode = configured_precision()
        self.precision_choice = precision.choose_precision(precision_mode, device)
        self.precision = self.precision_choice.precision  # "fp32", "bf16" or "int8"
        self.allocator = (
            allocator.configure() if on_cpu else "not tuned (the model is not on the CPU)"
        )
        self.backbone_path = fusion.backbone_path(model, device, self.precision, fuse_backbone)
        fused = self.backbone_path.startswith("fused")
        if use_winograd is None:  # M2FP_WINOGRAD, read where all settings are read
            from shared.config import winograd_mode

            use_winograd = winograd_mode() == "auto"
        if not use_winograd:
            why_not: str | None = "switched off"
        elif not fused:
            why_not = "the fused CPU backbone does not run"
        else:
            why_not = winograd.unavailable_reason()
        plan = winograd.plan_for(cpu_features()) if why_not is None else None
        if fused:
            model = fusion.with_fused_backbone(model.eval(), plan)
        if plan is not None:
            model = fusion.with_winograd_fpn(model, plan)
        self.winograd_path = winograd.describe(model, plan) if plan else f"off: {why_not}"
        self.encoder_path = "as built"  # the encoder FFN: oneDNN linears on CPU but in int8
        onednn = on_cpu and self.precision in ("fp32", "bf16x3", "bf16") and dense.available()
        if onednn and self.backbone_path.startswith("fused"):
            model = fusion.with_fused_encoder(model)
            self.encoder_path = "fused FFN"
        # Every nn.Linear through oneDNN (worker.m2fp.dense: MKL runs AVX2 code on AMD CPUs).
        self.dense_path = "as built"
        if onednn:
            model = fusion.with_onednn_linears(model)
            self.dense_path = "oneDNN"
        self.amx_path, self._amx_packs = self._prepare_amx(model)
        self.model = precision.prepare_model(model.eval(), self.precision)
        self.config = model.config
        self.untrained = untrained  # build_model already announced it loudly
        self.variant = model.config.name
        self.device = device
        self.max_side = max_side
        self.class_names: tuple[str, ...] = tuple(
            model.config.class_names[: model.config.num_parsing]
        )

    @contextlib.contextmanager
    def network_context(self) -> Iterator[None]:
        """What `self.model`'s forward runs within: the precision's arithmetic and, in bf16x3,
        the attention projections' AMX weights (`dense.amx_products`). The benchmarks that call
        `self.model` themselves enter it too."""
        with precision.arithmetic(self.precision, self.device), dense.amx_products(self._amx_packs):
            yield

    def _prepare_amx(self, model: nn.Module) -> tuple[str, dict]:
        """(what runs, the linears' packs): in bf16x3, the products as three bf16 AMX products
        (`worker.m2fp.amx`, `fusion.with_amx`); else "off: <precision>"."""
        if self.precision != "bf16x3":
            return f"off: precision {self.precision}", {}
        packs, described = fusion.with_amx(model)
        return described, packs

    @classmethod
    def from_weights(
        cls,
        weights: str,
        variant: str = "cihp",
        device: str = "cpu",
        max_side: int = 1920,
        threads: int | None = None,
        deform_attn: str | None = None,
        data: bytes | None = None,
        precision_mode: str | None = None,
        use_winograd: bool | None = None,
    ) -> Predictor:
        """Build the model from `weights` (see `build_model`, `data` included) and wrap it."""
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, but got {threads}")
            torch.set_num_threads(threads)
        if max_side < 32:  # before the (slow) model build
            raise ValueError(f"max_side must be >= 32, but got {max_side}")
        model, info = build_model(weights, variant=variant, device=device, data=data)
        return cls(
            model,
            untrained=info.untrained,
            max_side=max_side,
            deform_attn=deform_attn,
            precision_mode=precision_mode,
            use_winograd=use_winograd,
        )

    def preprocess(self, image: np.ndarray) -> PreprocessedImage:
        """Run the variant's preprocessing (resize or centre-pad) on an RGB uint8 image."""
        config = self.config
        return preprocess_image(
            image,
            config.single_human,
            config.min_size_test,
            config.max_size_test,
            config.single_human_input_size,
        )

    def _forward(
        self, preprocessed: Sequence[PreprocessedImage]
    ) -> tuple[torch.Tensor, torch.Tensor, list, tuple]:
        """Run the network on preprocessed images; returns logits, masks, unpadded sizes, padded size."""
        arrays = [
            item.image if item.image.flags.writeable else item.image.copy() for item in preprocessed
        ]
        tensors = [
            torch.from_numpy(array).permute(2, 0, 1) for array in arrays
        ]  # (h, w, 3) -> (3, h, w) each
        padded, image_sizes = self.model.normalize_and_pad(tensors)  # (B, 3, Hp, Wp)
        with self.network_context():
            output = self.model(padded)
        return (
            output.pred_logits.float(),  # the postprocess runs in fp32 whatever the precision
            output.pred_masks.float(),
            image_sizes,
            (int(padded.shape[2]), int(padded.shape[3])),
        )

    def _postprocess(
        self,
        preprocessed: PreprocessedImage,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        padded_size: tuple[int, int],
        image_size: tuple[int, int],
        **options: Any,
    ) -> MultiHumanParsing | SingleHumanParsing:
        """Run the variant's readout for one image at its working size."""
        config = self.config
        if config.single_human:
            if preprocessed.crop_box is None:
                raise ValueError("single-human preprocessing must give a crop box")
            return parse_single_human(
                class_logits,
                mask_logits,
                padded_size,
                image_size,
                preprocessed.crop_box,
                preprocessed.original_size,
                config.class_names,
                **options,
            )
        return parse_multi_human(
            class_logits,
            mask_logits,
            padded_size,
            image_size,
            preprocessed.original_size,
            config.class_names,
            num_parsing=config.num_parsing,
            topk=config.test_topk_per_image,
            **options,
        )

    def infer(self, image: np.ndarray, **postprocess_options: Any) -> Inference:
        """Preprocess, forward and postprocess one image at its own size (no `max_side` downsizing).

        `postprocess_options` go to `parse_multi_human` / `parse_single_human` (e.g. `chunk_size`).
        """
        check_rgb_image(image)
        with torch.inference_mode():
            started = time.perf_counter()
            preprocessed = self.preprocess(image)
            forward_started = time.perf_counter()
            class_logits, mask_logits, image_sizes, padded_size = self._forward([preprocessed])
            self._synchronize()
            post_started = time.perf_counter()
            parsing = self._postprocess(
                preprocessed,
                class_logits[0],
                mask_logits[0],
                padded_size,
                image_sizes[0],
                **postprocess_options,
            )
            finished = time.perf_counter()
        timings = {
            "preprocess": forward_started - started,
            "forward": post_started - forward_started,
            "postprocess": finished - post_started,
        }
        return Inference(
            preprocessed,
            padded_size,
            image_sizes[0],
            class_logits[0],
            mask_logits[0],
            parsing,
            timings,
        )

    def predict(self, image_rgb: np.ndarray) -> ParsingResult:
        """Parse one (H, W, 3) uint8 RGB image; every output is at (H, W)."""
        check_rgb_image(image_rgb)
        started = time.perf_counter()
        working = downsize_to_max_side(image_rgb, self.max_side)
        downsize_seconds = time.perf_counter() - started
        inference = self.infer(working)
        map_started = time.perf_counter()
        result = self._to_input_size(inference.parsing, image_rgb.shape[0], image_rgb.shape[1])
        timings = dict(inference.timings)
        timings["preprocess"] += downsize_seconds
        timings["postprocess"] += time.perf_counter() - map_started
        result.timings = timings
        return result

    def padded_size(self, preprocessed: PreprocessedImage) -> tuple[int, int]:
        """(Hp, Wp) the network input of a preprocessed image is padded to (multiples of size_divisibility)."""
        divisibility = self.config.size_divisibility
        height, width = preprocessed.image.shape[:2]
        return -(-height // divisibility) * divisibility, -(-width // divisibility) * divisibility

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[ParsingResult]:
        """Parse several images, one forward pass per padded size; results equal those of `predict`.

        The network has no padding mask (as the reference): padding an image further than its own
        multiple of 32 changes its features (convolutions and attention see the extra zeros), hence its
        maps. So images are grouped by the size `predict` pads them to (`padded_size`), and each group runs
        as one batch: inside a group every input is what `predict` would give the network.
        """
        if len(images) == 0:
            return []
        for image in images:
            check_rgb_image(image)
        with torch.inference_mode():
            started = time.perf_counter()
            preprocessed = [
                self.preprocess(downsize_to_max_side(image, self.max_side)) for image in images
            ]
            groups: dict[tuple[int, int], list[int]] = {}
            for index, item in enumerate(preprocessed):
                groups.setdefault(self.padded_size(item), []).append(index)
            forward_seconds, post_seconds = 0.0, 0.0
            results: list[ParsingResult | None] = [None] * len(images)
            forward_started = time.perf_counter()
            for indices in groups.values():
                group_forward, group_post = self._run_group(images, preprocessed, indices, results)
                forward_seconds += group_forward
                post_seconds += group_post
        count = len(images)
        finished = cast(list[ParsingResult], results)  # each index was in exactly one group
        for result in finished:  # the batch's time, shared equally
            result.timings = {
                "preprocess": (forward_started - started) / count,
                "forward": forward_seconds / count,
                "postprocess": post_seconds / count,
            }
        return finished

    def _run_group(
        self,
        images: Sequence[np.ndarray],
        preprocessed: Sequence[PreprocessedImage],
        indices: Sequence[int],
        results: list[ParsingResult | None],
    ) -> tuple[float, float]:
        """One forward pass for images of one padded size; fills `results`; (forward, post) s."""
        group_started = time.perf_counter()
        class_logits, mask_logits, image_sizes, padded_size = self._forward(
            [preprocessed[i] for i in indices]
        )
        self._synchronize()
        post_started = time.perf_counter()
        for row, index in enumerate(indices):
            parsing = self._postprocess(
                preprocessed[index],
                class_logits[row],
                mask_logits[row],
                padded_size,
                image_sizes[row],
            )
            results[index] = self._to_input_size(
                parsing, images[index].shape[0], images[index].shape[1]
            )
        return post_started - group_started, time.perf_counter() - post_started

    def _synchronize(self) -> None:
        """Wait for queued GPU work so that stage timings are honest."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _to_input_size(
        self, parsing: MultiHumanParsing | SingleHumanParsing, height: int, width: int
    ) -> ParsingResult:
        """Scale a working-size parsing back to the input size (nearest maps, recomputed persons)."""
        working_height, working_width = parsing.label_map.shape
        if (working_height, working_width) == (height, width):
            return ParsingResult(
                parsing.label_map, parsing.instance_map, parsing.persons, parsing.parts
            )
        scale_x, scale_y = width / working_width, height / working_height
        label_map = upscale_nearest(parsing.label_map, height, width)
        instance_map = upscale_nearest(parsing.instance_map, height, width)
        fallback_boxes = [
            scale_box(person["box"], scale_x, scale_y, width, height) for person in parsing.persons
        ]
        persons = describe_persons(
            label_map,
            instance_map,
            [person["score"] for person in parsing.persons],
            fallback_boxes,
            self.class_names,
        )
        parts = [
            {
                **part,
                "area": math.floor(part["area"] * scale_x * scale_y + 0.5),
                "box": scale_box(part["box"], scale_x, scale_y, width, height),
            }
            for part in parsing.parts
        ]
        return ParsingResult(label_map, instance_map, persons, parts)
