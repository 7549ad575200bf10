"""Per-person grouping of a parsing (beyond the reference, which returns ungrouped part masks).

This module owns everything the product adds on top of the reference readout of
`worker.m2fp.postprocess`: region statistics (pixels per person and class, boxes, areas), the
person-index map, the person and part dicts, and their scaling to another size. It works on NumPy
maps and needs nothing of the network.

Rules (multi-human):
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

Single-human: one person (index 1) owning every foreground pixel, if any; one part per foreground class.

Boxes are [x0, y0, x1, y1] in pixels with x1, y1 exclusive (width = x1 - x0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

MAX_PERSONS = 255  # instance_map is uint8 and 0 means "no person"


class MaskedInstance(Protocol):
    """What grouping needs of a kept instance (`worker.m2fp.postprocess.Instance` is one)."""

    category_id: int
    score: float
    query: int

    @property
    def mask(self) -> np.ndarray: ...


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
    people = instance_map.astype(np.int64)
    pair_index = people * num_labels + label_map  # (H, W)
    counts = np.bincount(pair_index.ravel(), minlength=bins * num_labels).reshape(bins, num_labels)
    boxes = np.zeros((bins, 4), dtype=np.int64)
    if num_persons == 0:
        return counts, boxes
    # Person present per row / per column: (bins, H) and (bins, W) occupancy from one bincount each.
    row_counts = np.bincount(
        (people * height + np.arange(height)[:, None]).ravel(), minlength=bins * height
    )
    column_counts = np.bincount(
        (people * width + np.arange(width)[None, :]).ravel(), minlength=bins * width
    )
    row_present = row_counts.reshape(bins, height)[1:] > 0  # (N, H)
    column_present = column_counts.reshape(bins, width)[1:] > 0  # (N, W)
    present = row_present.any(axis=1)  # (N,) persons owning at least one pixel
    boxes[1:, 0] = column_present.argmax(axis=1)
    boxes[1:, 1] = row_present.argmax(axis=1)
    boxes[1:, 2] = width - column_present[:, ::-1].argmax(axis=1)
    boxes[1:, 3] = height - row_present[:, ::-1].argmax(axis=1)
    boxes[1:][~present] = 0
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
        box = (
            [int(value) for value in boxes[index]]
            if area
            else [int(value) for value in fallback_boxes[index - 1]]
        )
        parts = [
            {
                "class_id": class_id,
                "name": class_names[class_id],
                "area": int(counts[index, class_id]),
            }
            for class_id in range(1, num_labels)
            if counts[index, class_id] > 0
        ]
        persons.append(
            {"index": index, "score": float(score), "box": box, "area": area, "parts": parts}
        )
    return persons


def owning_person(instance_map: np.ndarray, mask: np.ndarray, num_persons: int) -> int:
    """The person owning most of the mask's pixels in `instance_map` (lower index on ties); 0 if none."""
    if num_persons == 0:
        return 0
    votes = np.bincount(instance_map[mask], minlength=num_persons + 1)
    votes[0] = 0
    return int(votes.argmax()) if votes.any() else 0


def group_persons(
    label_map: np.ndarray,
    instances: Sequence[MaskedInstance],
    winner: np.ndarray | None,
    human_id: int,
    class_names: Sequence[str],
) -> tuple[np.ndarray, list[dict]]:
    """Build `instance_map` and the person dicts from the kept humans (module docstring).

    Args:
        label_map: (H, W) uint8 class ids.
        instances: the kept instances (parts and humans).
        winner: (H, W) query whose kept human logit is highest there and > 0, -1 where none; None if no
            human was kept.
        human_id: class id of Human.
        class_names: names of the parsing classes.
    """
    humans = [instance for instance in instances if instance.category_id == human_id]
    humans = sorted(humans, key=lambda instance: (-instance.score, instance.query))[:MAX_PERSONS]
    instance_map = np.zeros(label_map.shape, dtype=np.uint8)
    if not humans or winner is None:
        return instance_map, []
    person_of_query = np.zeros(
        int(winner.max()) + 2, dtype=np.uint8
    )  # shifted by 1 so -1 maps to 0
    for index, human in enumerate(humans, start=1):
        if human.query + 1 < person_of_query.size:
            person_of_query[human.query + 1] = index
    instance_map = person_of_query[winner + 1]
    instance_map[label_map == 0] = 0
    fallback_boxes = [mask_box(human.mask) for human in humans]
    persons = describe_persons(
        label_map, instance_map, [human.score for human in humans], fallback_boxes, class_names
    )
    return instance_map, persons


def describe_parts(
    instances: Sequence[MaskedInstance],
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
                "area": int(np.count_nonzero(mask)),  # = mask.sum(), 10x faster on bools
                "box": mask_box(mask),
            }
        )
    return parts


def single_human_persons(
    label_map: np.ndarray, winning: np.ndarray, class_names: Sequence[str]
) -> tuple[np.ndarray, list[dict]]:
    """The single-human `instance_map` (1 on foreground) and its one person, scored as the pipeline does.

    `winning` is sigmoid(sem_seg) of the winning class per pixel (float64); the score is
    `sum(winning over foreground) / (foreground pixels + 1)`.
    """
    foreground = label_map != 0
    instance_map = foreground.astype(np.uint8)
    if not foreground.any():
        return instance_map, []
    person_score = float(winning[foreground].sum() / (np.count_nonzero(foreground) + 1.0))
    return instance_map, describe_persons(
        label_map, instance_map, [person_score], [[0, 0, 0, 0]], class_names
    )


def single_human_parts(
    label_map: np.ndarray,
    class_ids: np.ndarray,
    class_scores: np.ndarray,
    class_names: Sequence[str],
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
                "area": int(np.count_nonzero(mask)),  # = mask.sum(), 10x faster on bools
                "box": mask_box(mask),
            }
        )
    return sorted(parts, key=lambda part: -part["score"])


def scale_box(
    box: Sequence[int], scale_x: float, scale_y: float, width: int, height: int
) -> list[int]:
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
