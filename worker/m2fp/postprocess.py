"""Postprocessing of M2FP outputs: semantic readout, instance parsing and per-person grouping.

Mask logits come out of the network at 1/4 of the padded input size. As in the ModelScope pipeline they are
resized bilinearly (align_corners=False) to the padded input size, cropped to the unpadded image (and, for
the single-human model, to the centring crop box), then resized bilinearly to the output size.

Multi-human (CIHP) readout, `parse_multi_human`:
  * `label_map` (H, W) uint8: argmax over the parsing classes 0..19 of the semantic map
    `sum_q softmax(class_logits)[q, c] * sigmoid(mask_logit_q)`, computed from the mask logits at output size
    (ModelScope's `sem_seg_postprocess_before_inference=True`).
  * instances: the top-100 (query, class) pairs of the flattened class scores (no-object dropped), each
    scored `class_score * mask_score`, with `mask_score` the mean sigmoid over the pixels where the mask
    logit is > 0. Humans (class `num_parsing`) are kept if score > 0.1, parts (not background, not Human) if
    score >= 0.1. A kept instance's mask is `mask_logit > 0` at output size.
  * Memory: the reference resizes all queries' mask logits to the output size at once (100 x H x W float32,
    1.1 GB at 1920 x 1440). Here queries are processed in chunks: the 20-channel semantic map is accumulated,
    mask scores and masks are computed per chunk, and only the kept queries' masks are stored, bit-packed.
    Peak extra memory is about 20 x H x W float32 plus one chunk. The chunk size changes the result only by
    float rounding of the semantic sums (about 1e-7).

Per-person grouping (beyond the reference, which returns ungrouped part masks):
  * Persons are the kept human instances sorted by score, descending (ties: lower query first), indexed
    1..N; at most 255 (uint8 map), lower-scored humans beyond that are dropped.
  * `instance_map` (H, W) uint8: a pixel belongs to the person whose human-mask logit is highest there,
    among the persons whose logit there is > 0, provided the pixel is foreground (`label_map != 0`);
    otherwise 0. Ties between equal logits go to the lower query index (measure-zero for float logits).
    A model that finds no human yields an all-zero map and no persons (none are invented).
  * Each person: `index`, `score`, `area` (its pixels in `instance_map`), `box` of those pixels (of its
    whole human mask if it owns no foreground pixel) and `parts`: {class_id, name, area} for each class of
    `label_map` among its pixels, by class id.
  * Each kept part instance is attached to the person owning most of its mask's pixels in `instance_map`
    (0 if its mask covers no person's pixel).

Single-human (LIP) readout, `parse_single_human`: the semantic map is computed at the padded input size,
cropped to the crop box and resized to the output size (`sem_seg`); `label_map` is its argmax; a class's
score is `sum(sigmoid(sem_seg[c]) over its pixels) / (pixels + 1)` as in the pipeline. There is one person
(index 1) owning every foreground pixel, if any; its score uses the same formula over all foreground pixels.

Boxes are [x0, y0, x1, y1] in pixels with x1, y1 exclusive (width = x1 - x0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

MAX_PERSONS = 255  # instance_map is uint8 and 0 means "no person"
HUMAN_SCORE_THRESHOLD = 0.1  # humans kept if score > this
PART_SCORE_THRESHOLD = 0.1  # parts kept if score >= this
MASK_SCORE_EPSILON = 1e-6
CHUNK_MEMORY_BUDGET_BYTES = 192 * 1024 * 1024  # per-chunk working memory when chunk_size is automatic


@dataclass
class Instance:
    """A kept (query, class) pair of the instance parsing readout.

    Attributes:
        category_id: class id (1..19 parts, `num_parsing` = Human).
        score: class score x mask score.
        query: the query it came from.
        packed_mask: `mask_logit > 0` at output size, `np.packbits` of the flattened (H, W) mask.
        mask_shape: (H, W).
    """

    category_id: int
    score: float
    query: int
    packed_mask: np.ndarray = field(repr=False)
    mask_shape: tuple[int, int]

    @property
    def mask(self) -> np.ndarray:
        """The (H, W) boolean mask."""
        height, width = self.mask_shape
        return np.unpackbits(self.packed_mask, count=height * width).reshape(height, width).astype(bool)


@dataclass
class TopK:
    """The raw top-k (query, class) list of the instance readout, in descending class-score order."""

    labels: np.ndarray  # (K,) int64 class ids
    queries: np.ndarray  # (K,) int64 query indices
    class_scores: np.ndarray  # (K,) float32 softmax class scores
    mask_scores: np.ndarray  # (K,) float32
    scores: np.ndarray  # (K,) float32 class_scores * mask_scores


@dataclass
class MultiHumanParsing:
    """Everything `parse_multi_human` computes, at the output size (H, W)."""

    label_map: np.ndarray  # (H, W) uint8 class ids 0..num_parsing-1
    instance_map: np.ndarray  # (H, W) uint8 person index, 0 = no person
    persons: list[dict]
    parts: list[dict]
    instances: list[Instance]  # kept parts and humans, by descending score
    topk: TopK
    semantic_map: np.ndarray | None = None  # (num_parsing, H, W) float32, only if requested
    semantic_outputs: np.ndarray | None = None  # (num_parsing, H, W) float32 pasted instances, only if requested


@dataclass
class SingleHumanParsing:
    """Everything `parse_single_human` computes, at the output size (H, W)."""

    label_map: np.ndarray  # (H, W) uint8
    instance_map: np.ndarray  # (H, W) uint8, 1 on foreground pixels
    persons: list[dict]
    parts: list[dict]
    class_ids: np.ndarray  # (K,) int64 classes present in label_map, ascending
    class_scores: np.ndarray  # (K,) float64 pipeline scores of those classes
    sem_seg: np.ndarray | None = None  # (num_classes, H, W) float32, only if requested


def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Semantic map `sum_q softmax(class_logits)[q, :-1] * sigmoid(mask_logits[q])`.

    Args:
        class_logits: (Q, C+1) logits, the last class being "no object".
        mask_logits: (Q, H, W) mask logits.

    Returns:
        (C, H, W) float tensor.
    """
    class_probabilities = F.softmax(class_logits, dim=-1)[:, :-1]  # (Q, C)
    return torch.einsum("qc,qhw->chw", class_probabilities, mask_logits.sigmoid())  # (C, H, W)


def resize_mask_logits(
    mask_logits: torch.Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    crop_box: Sequence[int] | None = None,
) -> torch.Tensor:
    """Bring (Q, h, w) maps to the output size: resize to the padded size, crop, resize to `output_size`.

    Args:
        mask_logits: (Q, h, w) maps at 1/4 of the padded network input.
        padded_size: (Hp, Wp) of the padded network input.
        image_size: (h_img, w_img) of the unpadded network input inside it.
        output_size: (H, W) wanted.
        crop_box: optional (x0, y0, x1, y1) inside the unpadded input (single-human centring).

    Returns:
        (Q, H, W) float tensor.
    """
    maps = F.interpolate(mask_logits[None], size=tuple(padded_size), mode="bilinear", align_corners=False)[0]
    maps = maps[:, : image_size[0], : image_size[1]]  # (Q, h_img, w_img)
    if crop_box is not None:
        x0, y0, x1, y1 = (int(value) for value in crop_box)
        maps = maps[:, y0:y1, x0:x1]  # (Q, y1-y0, x1-x0)
    if tuple(maps.shape[-2:]) != tuple(output_size):
        maps = F.interpolate(maps[None], size=tuple(output_size), mode="bilinear", align_corners=False)[0]
    return maps


def automatic_chunk_size(num_queries: int, padded_size: tuple[int, int], output_size: tuple[int, int]) -> int:
    """Queries per chunk so that one chunk's working tensors stay within CHUNK_MEMORY_BUDGET_BYTES."""
    # Per query: the padded-size resize (float32), then logits and sigmoid (float32) and mask (bool) at
    # output size, plus some slack for the allocator.
    bytes_per_query = 4 * padded_size[0] * padded_size[1] + 10 * output_size[0] * output_size[1]
    return max(1, min(num_queries, CHUNK_MEMORY_BUDGET_BYTES // max(1, bytes_per_query)))


def check_prediction(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> None:
    """Raise ValueError unless class logits are (Q, C+1) and mask logits (Q, h, w) with the same Q."""
    if class_logits.dim() != 2 or mask_logits.dim() != 3 or class_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(
            f"expected class_logits (Q, C+1) and mask_logits (Q, h, w), "
            f"but got {tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
        )


def check_size(name: str, size: Sequence[int]) -> tuple[int, int]:
    """Return `size` as a (height, width) pair of positive ints, or raise ValueError."""
    if len(size) != 2 or min(int(value) for value in size) < 1:
        raise ValueError(f"{name} must be a positive (height, width), but got {tuple(size)}")
    return int(size[0]), int(size[1])


def mask_box(mask: np.ndarray) -> list[int]:
    """Box [x0, y0, x1, y1] (exclusive x1, y1) of the True pixels of a (H, W) mask; [0, 0, 0, 0] if none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return [0, 0, 0, 0]
    columns = np.flatnonzero(mask.any(axis=0))
    return [int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1]


def region_statistics(
    label_map: np.ndarray, instance_map: np.ndarray, num_persons: int, num_labels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per person: pixel counts per class and box, in O(H*W).

    Returns:
        counts (num_persons + 1, num_labels) int64 and boxes (num_persons + 1, 4) int64 [x0, y0, x1, y1],
        row 0 being "no person"; a person without pixels gets a zero box.
    """
    height, width = instance_map.shape
    bins = num_persons + 1
    pair_index = instance_map.astype(np.int64) * num_labels + label_map  # (H, W)
    counts = np.bincount(pair_index.ravel(), minlength=bins * num_labels).reshape(bins, num_labels)
    row_counts = np.zeros((bins, height), dtype=np.int64)  # persons present per row
    column_counts = np.zeros((bins, width), dtype=np.int64)
    if num_persons > 0:
        row_ids = np.broadcast_to(np.arange(height)[:, None], (height, width))
        column_ids = np.broadcast_to(np.arange(width)[None, :], (height, width))
        people = instance_map.astype(np.int64)
        row_counts = np.bincount((people * height + row_ids).ravel(), minlength=bins * height).reshape(bins, height)
        column_counts = np.bincount((people * width + column_ids).ravel(), minlength=bins * width).reshape(bins, width)
    boxes = np.zeros((bins, 4), dtype=np.int64)
    for person in range(1, bins):
        rows = np.flatnonzero(row_counts[person])
        if rows.size:
            columns = np.flatnonzero(column_counts[person])
            boxes[person] = (columns[0], rows[0], columns[-1] + 1, rows[-1] + 1)
    return counts, boxes


def describe_persons(
    label_map: np.ndarray,
    instance_map: np.ndarray,
    scores: Sequence[float],
    fallback_boxes: Sequence[Sequence[int]],
    class_names: Sequence[str],
) -> list[dict]:
    """Person dicts (index, score, box, area, parts) from the maps; persons are 1..len(scores).

    A person that owns no pixel gets `fallback_boxes[index - 1]` (its human mask's box) and area 0.
    """
    num_labels = len(class_names)
    counts, boxes = region_statistics(label_map, instance_map, len(scores), num_labels)
    persons = []
    for index, score in enumerate(scores, start=1):
        area = int(counts[index].sum())
        box = [int(value) for value in boxes[index]] if area else [int(value) for value in fallback_boxes[index - 1]]
        parts = [
            {"class_id": class_id, "name": class_names[class_id], "area": int(counts[index, class_id])}
            for class_id in range(1, num_labels)
            if counts[index, class_id] > 0
        ]
        persons.append({"index": index, "score": float(score), "box": box, "area": area, "parts": parts})
    return persons


def owning_person(instance_map: np.ndarray, mask: np.ndarray, num_persons: int) -> int:
    """The person owning most of the mask's pixels in `instance_map` (lower index on ties); 0 if none."""
    if num_persons == 0:
        return 0
    votes = np.bincount(instance_map[mask], minlength=num_persons + 1)
    votes[0] = 0
    return int(votes.argmax()) if votes.any() else 0


class _MultiHumanAccumulator:
    """Chunk-by-chunk state of `parse_multi_human`: semantic sums, human winners, kept masks."""

    def __init__(self, num_parsing: int, output_size: tuple[int, int], device: torch.device, paste: bool) -> None:
        height, width = output_size
        self.output_size = output_size
        self.semantic = torch.zeros((num_parsing, height * width), dtype=torch.float32, device=device)
        self.best_human_logit: torch.Tensor | None = None  # (H, W) running max of kept human logits (> 0)
        self.best_human_query: torch.Tensor | None = None  # (H, W) query holding that max, -1 = none
        self.pasted = torch.zeros_like(self.semantic) if paste else None
        self.paste_counts = torch.zeros_like(self.semantic) if paste else None

    def add_semantic(self, class_probabilities: torch.Tensor, probabilities: torch.Tensor) -> None:
        """Add (q, C) x (q, H*W) to the (C, H*W) semantic sums."""
        self.semantic.addmm_(class_probabilities.T, probabilities)  # (C, q) @ (q, HW) -> (C, HW)

    def add_human(self, query: int, logits: torch.Tensor) -> None:
        """Let a kept human's (H, W) logits claim the pixels where they beat every earlier human and 0."""
        if self.best_human_logit is None:
            self.best_human_logit = torch.zeros(self.output_size, dtype=torch.float32, device=logits.device)
            self.best_human_query = torch.full(self.output_size, -1, dtype=torch.int32, device=logits.device)
        better = logits > self.best_human_logit  # strict: ties keep the lower (earlier) query
        self.best_human_logit = torch.where(better, logits, self.best_human_logit)
        self.best_human_query.masked_fill_(better, query)

    def paste(self, class_id: int, score: float, probabilities: torch.Tensor) -> None:
        """Average `sigmoid(mask) * score` into class `class_id` where it exceeds 0.5 (reference's pasting).

        `probabilities` may be zeroed where the mask logit is <= 0: such pixels (sigmoid <= 0.5) never paste.
        """
        weighted = probabilities.reshape(-1) * score  # (H*W,)
        selected = weighted > 0.5
        self.pasted[class_id] += torch.where(selected, weighted, torch.zeros_like(weighted))
        self.paste_counts[class_id] += selected.to(torch.float32)


def select_topk(class_logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (query, class) pairs of softmax(class_logits)[:, :-1] flattened: scores, labels, queries."""
    class_scores = F.softmax(class_logits, dim=-1)[:, :-1]  # (Q, C)
    num_classes = class_scores.shape[1]
    flat_scores = class_scores.flatten()  # (Q*C,): index = query * C + class
    top_scores, top_indices = flat_scores.topk(min(topk, flat_scores.numel()), sorted=True)
    return top_scores, top_indices % num_classes, top_indices // num_classes


def parse_multi_human(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    class_names: Sequence[str],
    num_parsing: int = 20,
    topk: int = 100,
    chunk_size: int | None = None,
    keep_semantic_map: bool = False,
    paste_threshold: float | None = None,
) -> MultiHumanParsing:
    """Multi-human readout: label map, kept instances, persons and their parts (module docstring).

    Args:
        class_logits: (Q, num_parsing + 2) logits of one image: parsing classes, Human, no-object.
        mask_logits: (Q, Hp/4, Wp/4) mask logits of that image.
        padded_size: (Hp, Wp) of the padded network input.
        image_size: (h, w) of the unpadded network input.
        output_size: (H, W) of the results.
        class_names: names of class ids 0..num_parsing-1 (parts use them).
        num_parsing: parsing classes (background + parts); class id `num_parsing` is Human.
        topk: (query, class) pairs considered.
        chunk_size: queries resized at once; None picks one from a memory budget. Does not change results.
        keep_semantic_map: also return the (num_parsing, H, W) semantic map.
        paste_threshold: if set, also return the reference's `semantic_outputs` (instances with score >= it,
            pasted where sigmoid(mask) * score > 0.5, averaged).

    Returns:
        A MultiHumanParsing.
    """
    check_prediction(class_logits, mask_logits)
    if class_logits.shape[1] != num_parsing + 2:
        raise ValueError(
            f"class_logits must have num_parsing + 2 = {num_parsing + 2} columns (parts, Human, no-object), "
            f"but got {class_logits.shape[1]}"
        )
    if len(class_names) < num_parsing:
        raise ValueError(f"class_names must name the {num_parsing} parsing classes, but got {len(class_names)}")
    output_size = check_size("output_size", output_size)
    padded_size, image_size = check_size("padded_size", padded_size), check_size("image_size", image_size)
    num_queries = class_logits.shape[0]
    if chunk_size is None:
        chunk_size = automatic_chunk_size(num_queries, padded_size, output_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, but got {chunk_size}")

    class_logits = class_logits.float()
    mask_logits = mask_logits.float()
    human_id = num_parsing
    class_probabilities = F.softmax(class_logits, dim=-1)[:, :num_parsing]  # (Q, num_parsing)
    top_scores, top_labels, top_queries = select_topk(class_logits, topk)
    mask_scores = torch.zeros(num_queries, dtype=torch.float32, device=class_logits.device)
    accumulator = _MultiHumanAccumulator(num_parsing, output_size, class_logits.device, paste_threshold is not None)
    entries_by_query: dict[int, list[int]] = {}
    for entry, query in enumerate(top_queries.tolist()):
        entries_by_query.setdefault(query, []).append(entry)
    kept_entries: list[tuple[int, float]] = []  # (top-k entry, score)
    packed_masks: dict[int, np.ndarray] = {}

    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        logits = resize_mask_logits(mask_logits[start:stop], padded_size, image_size, output_size)  # (q, H, W)
        logits = logits.reshape(stop - start, -1)  # (q, H*W)
        probabilities = logits.sigmoid()  # (q, H*W)
        positive = logits > 0  # (q, H*W)
        accumulator.add_semantic(class_probabilities[start:stop], probabilities)
        # From here on `probabilities` holds sigmoid(m) * [m > 0] (in place: no extra chunk-sized tensor).
        probabilities.mul_(positive)
        positive_counts = positive.sum(1, dtype=torch.float32)
        mask_scores[start:stop] = probabilities.sum(1) / (positive_counts + MASK_SCORE_EPSILON)
        for offset, query in enumerate(range(start, stop)):
            for entry in entries_by_query.get(query, ()):
                label = int(top_labels[entry])
                score = top_scores[entry] * mask_scores[query]  # float32, as the reference
                is_human = label == human_id
                keep = bool(score > HUMAN_SCORE_THRESHOLD) if is_human else (
                    label != 0 and bool(score >= PART_SCORE_THRESHOLD)
                )
                if paste_threshold is not None and label < num_parsing and bool(score >= paste_threshold):
                    accumulator.paste(label, float(score), probabilities[offset])
                if not keep:
                    continue
                kept_entries.append((entry, float(score)))
                if query not in packed_masks:
                    packed_masks[query] = np.packbits(positive[offset].cpu().numpy())
                if is_human:
                    accumulator.add_human(query, logits[offset].reshape(output_size))
        del logits, probabilities, positive

    semantic = accumulator.semantic.reshape(num_parsing, *output_size)  # (C, H, W)
    label_map = semantic.argmax(0).to(torch.uint8).cpu().numpy()
    instances = []
    for entry, score in sorted(kept_entries, key=lambda item: (-item[1], item[0])):
        query = int(top_queries[entry])
        instances.append(Instance(int(top_labels[entry]), score, query, packed_masks[query], output_size))
    instance_map, persons = group_persons(label_map, instances, accumulator, human_id, class_names[:num_parsing])
    parts = describe_parts(instances, instance_map, len(persons), human_id, class_names)
    topk_result = TopK(
        labels=top_labels.cpu().numpy().astype(np.int64),
        queries=top_queries.cpu().numpy().astype(np.int64),
        class_scores=top_scores.cpu().numpy().astype(np.float32),
        mask_scores=mask_scores[top_queries].cpu().numpy().astype(np.float32),
        scores=(top_scores * mask_scores[top_queries]).cpu().numpy().astype(np.float32),
    )
    semantic_outputs = None
    if paste_threshold is not None:
        counts = accumulator.paste_counts.clamp(min=1.0)
        semantic_outputs = (accumulator.pasted / counts).reshape(num_parsing, *output_size).cpu().numpy()
    return MultiHumanParsing(
        label_map=label_map,
        instance_map=instance_map,
        persons=persons,
        parts=parts,
        instances=instances,
        topk=topk_result,
        semantic_map=semantic.cpu().numpy() if keep_semantic_map else None,
        semantic_outputs=semantic_outputs,
    )


def group_persons(
    label_map: np.ndarray,
    instances: Sequence[Instance],
    accumulator: _MultiHumanAccumulator,
    human_id: int,
    class_names: Sequence[str],
) -> tuple[np.ndarray, list[dict]]:
    """Build `instance_map` and the person dicts from the kept humans (module docstring)."""
    humans = [instance for instance in instances if instance.category_id == human_id]
    humans = sorted(humans, key=lambda instance: (-instance.score, instance.query))[:MAX_PERSONS]
    instance_map = np.zeros(label_map.shape, dtype=np.uint8)
    if not humans or accumulator.best_human_query is None:
        return instance_map, []
    winner = accumulator.best_human_query.cpu().numpy()  # (H, W) query or -1
    person_of_query = np.zeros(int(winner.max()) + 2, dtype=np.uint8)  # shifted by 1 so -1 maps to 0
    for index, human in enumerate(humans, start=1):
        if human.query + 1 < person_of_query.size:
            person_of_query[human.query + 1] = index
    instance_map = person_of_query[winner + 1]
    instance_map[label_map == 0] = 0
    fallback_boxes = [mask_box(human.mask) for human in humans]
    persons = describe_persons(label_map, instance_map, [human.score for human in humans], fallback_boxes, class_names)
    return instance_map, persons


def describe_parts(
    instances: Sequence[Instance],
    instance_map: np.ndarray,
    num_persons: int,
    human_id: int,
    class_names: Sequence[str],
) -> list[dict]:
    """Part dicts (class_id, name, score, person, area, box) of the kept part instances, by descending score."""
    parts = []
    for instance in instances:
        if instance.category_id == human_id:
            continue
        mask = instance.mask
        parts.append(
            {
                "class_id": instance.category_id,
                "name": class_names[instance.category_id],
                "score": float(instance.score),
                "person": owning_person(instance_map, mask, num_persons),
                "area": int(mask.sum()),
                "box": mask_box(mask),
            }
        )
    return parts


def parse_single_human(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    crop_box: Sequence[int],
    output_size: tuple[int, int],
    class_names: Sequence[str],
    chunk_size: int | None = None,
    keep_sem_seg: bool = False,
) -> SingleHumanParsing:
    """Single-human readout: semantic map at padded size, cropped and resized; argmax; one person.

    Args:
        class_logits: (Q, C+1) logits of one image (C classes incl. background, then no-object).
        mask_logits: (Q, Hp/4, Wp/4) mask logits.
        padded_size: (Hp, Wp) of the padded network input.
        image_size: (h, w) of the unpadded network input.
        crop_box: (x0, y0, x1, y1) of the original image inside the network input.
        output_size: (H, W) of the results.
        class_names: names of class ids 0..C-1.
        chunk_size: queries upsampled at once; None picks one from a memory budget.
        keep_sem_seg: also return the (C, H, W) `sem_seg` map.

    Returns:
        A SingleHumanParsing.
    """
    check_prediction(class_logits, mask_logits)
    output_size = check_size("output_size", output_size)
    padded_size, image_size = check_size("padded_size", padded_size), check_size("image_size", image_size)
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    if len(class_names) < num_classes:
        raise ValueError(f"class_names must name the {num_classes} classes, but got {len(class_names)}")
    if chunk_size is None:
        chunk_size = automatic_chunk_size(num_queries, padded_size, padded_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, but got {chunk_size}")
    class_probabilities = F.softmax(class_logits.float(), dim=-1)[:, :-1]  # (Q, C)
    semantic = torch.zeros((num_classes, padded_size[0] * padded_size[1]), device=class_logits.device)
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        chunk = mask_logits[start:stop].float()[None]  # (1, q, h, w)
        upsampled = F.interpolate(chunk, size=padded_size, mode="bilinear", align_corners=False)[0]  # (q, Hp, Wp)
        semantic.addmm_(class_probabilities[start:stop].T, upsampled.reshape(stop - start, -1).sigmoid())
    semantic = semantic.reshape(num_classes, *padded_size)  # (C, Hp, Wp)
    sem_seg = resize_mask_logits(semantic, padded_size, image_size, output_size, crop_box)  # (C, H, W)
    # The map is already at padded size: resize_mask_logits' first resize is the identity there.
    label_map = sem_seg.argmax(0).to(torch.uint8).cpu().numpy()
    label_tensor = torch.from_numpy(label_map.astype(np.int64)).to(sem_seg.device)
    winning = torch.gather(sem_seg, 0, label_tensor[None]).sigmoid()[0].double().cpu().numpy()  # (H, W)
    sums = np.bincount(label_map.ravel(), weights=winning.ravel(), minlength=num_classes)
    counts = np.bincount(label_map.ravel(), minlength=num_classes)
    class_ids = np.flatnonzero(counts).astype(np.int64)
    class_scores = sums[class_ids] / (counts[class_ids] + 1.0)
    foreground = label_map != 0
    instance_map = foreground.astype(np.uint8)
    persons: list[dict] = []
    if foreground.any():
        person_score = float(winning[foreground].sum() / (foreground.sum() + 1.0))
        persons = describe_persons(label_map, instance_map, [person_score], [[0, 0, 0, 0]], class_names[:num_classes])
    parts = single_human_parts(label_map, class_ids, class_scores, class_names)
    return SingleHumanParsing(
        label_map=label_map,
        instance_map=instance_map,
        persons=persons,
        parts=parts,
        class_ids=class_ids,
        class_scores=class_scores,
        sem_seg=sem_seg.cpu().numpy() if keep_sem_seg else None,
    )


def single_human_parts(
    label_map: np.ndarray, class_ids: np.ndarray, class_scores: np.ndarray, class_names: Sequence[str]
) -> list[dict]:
    """One part dict per foreground class present in the single-human label map, by descending score."""
    parts = []
    for class_id, score in zip(class_ids.tolist(), class_scores.tolist(), strict=True):
        if class_id == 0:
            continue
        mask = label_map == class_id
        parts.append(
            {
                "class_id": class_id,
                "name": class_names[class_id],
                "score": float(score),
                "person": 1,
                "area": int(mask.sum()),
                "box": mask_box(mask),
            }
        )
    return sorted(parts, key=lambda part: -part["score"])


def scale_box(box: Sequence[int], scale_x: float, scale_y: float, width: int, height: int) -> list[int]:
    """Scale an exclusive [x0, y0, x1, y1] box, rounding outwards and clipping to (width, height)."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return [0, 0, 0, 0]
    return [
        max(0, math.floor(x0 * scale_x)),
        max(0, math.floor(y0 * scale_y)),
        min(width, math.ceil(x1 * scale_x)),
        min(height, math.ceil(y1 * scale_y)),
    ]
