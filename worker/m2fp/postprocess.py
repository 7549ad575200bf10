"""The reference readout of M2FP outputs: semantic map, label map and kept instances, as the pipeline does it.

This module owns what the reference pipeline computes from the network outputs (resizing, semantic
inference, top-k instance scoring, pasting) and which readout path computes it; the compiled op is
`worker.m2fp.ops.mask_readout`, `worker.m2fp.persons` owns the grouping per person.

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
  * Two paths compute the same readout (`read_with_chunks`, `read_with_op`); `worker.m2fp.ops` picks one
    (M2FP_DEFORM_ATTN: `auto` takes the op when it is built, `reference` always the chunks).
    The chunked PyTorch path is the reference and the fallback, and the only one that pastes
    (`paste_threshold`). The compiled op `m2fp::mask_readout` (csrc/mask_readout.cpp) does the
    per-(query, pixel) work in one pass over the output rows with the resize -> crop -> resize
    composed into separable taps (`worker.m2fp.interpolation`): semantic sums, their argmax and every
    query's mask-score sums, holding no (Q, H, W) tensor; `m2fp::mask_bits` then packs the kept
    queries' `logit > 0` with the same taps, and the kept humans' claims use their logits resized
    by the reference's code. Against the reference: semantic map and mask scores within ~1e-6
    relative (float rounding of the composed taps, a polynomial exp), label maps equal but at
    near-ties of two classes, kept masks equal but where a logit is within rounding of 0.

Per-person grouping (instance map, persons, part dicts, boxes) is `worker.m2fp.persons`; the readouts
call it last so that their results carry persons, and they own nothing of it.

Single-human (LIP) readout, `parse_single_human`: the semantic map is computed at the padded input size,
cropped to the crop box and resized to the output size (`sem_seg`); `label_map` is its argmax; a class's
score is `sum(sigmoid(sem_seg[c]) over its pixels) / (pixels + 1)` as in the pipeline. There is one person
(index 1) owning every foreground pixel, if any; its score uses the same formula over all foreground pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from worker.m2fp import ops
from worker.m2fp.interpolation import mask_taps
from worker.m2fp.persons import (
    describe_parts,
    group_persons,
    single_human_parts,
    single_human_persons,
)

HUMAN_SCORE_THRESHOLD = 0.1  # humans kept if score > this
PART_SCORE_THRESHOLD = 0.1  # parts kept if score >= this
MASK_SCORE_EPSILON = 1e-6
CHUNK_MEMORY_BUDGET_BYTES = (
    192 * 1024 * 1024
)  # per-chunk working memory when chunk_size is automatic


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
        return (
            np.unpackbits(self.packed_mask, count=height * width)
            .reshape(height, width)
            .astype(bool)
        )


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
    semantic_outputs: np.ndarray | None = (
        None  # (num_parsing, H, W) float32 pasted instances, only if requested
    )


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
    maps = F.interpolate(
        mask_logits[None], size=tuple(padded_size), mode="bilinear", align_corners=False
    )[0]
    maps = maps[:, : image_size[0], : image_size[1]]  # (Q, h_img, w_img)
    if crop_box is not None:
        x0, y0, x1, y1 = (int(value) for value in crop_box)
        maps = maps[:, y0:y1, x0:x1]  # (Q, y1-y0, x1-x0)
    if tuple(maps.shape[-2:]) != tuple(output_size):
        maps = F.interpolate(
            maps[None], size=tuple(output_size), mode="bilinear", align_corners=False
        )[0]
    return maps


def automatic_chunk_size(
    num_queries: int, padded_size: tuple[int, int], output_size: tuple[int, int]
) -> int:
    """Queries per chunk so that one chunk's working tensors stay within CHUNK_MEMORY_BUDGET_BYTES."""
    # Per query: the padded-size resize (float32), then logits and sigmoid (float32) and mask (bool) at
    # output size, plus some slack for the allocator.
    bytes_per_query = 4 * padded_size[0] * padded_size[1] + 10 * output_size[0] * output_size[1]
    return max(1, min(num_queries, CHUNK_MEMORY_BUDGET_BYTES // max(1, bytes_per_query)))


def check_prediction(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> None:
    """Raise ValueError unless class logits are (Q, C+1) and mask logits (Q, h, w) with the same Q."""
    if (
        class_logits.dim() != 2
        or mask_logits.dim() != 3
        or class_logits.shape[0] != mask_logits.shape[0]
    ):
        raise ValueError(
            f"expected class_logits (Q, C+1) and mask_logits (Q, h, w), "
            f"but got {tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
        )


def check_size(name: str, size: Sequence[int]) -> tuple[int, int]:
    """Return `size` as a (height, width) pair of positive ints, or raise ValueError."""
    if len(size) != 2 or min(int(value) for value in size) < 1:
        raise ValueError(f"{name} must be a positive (height, width), but got {tuple(size)}")
    return int(size[0]), int(size[1])


class _MultiHumanReadout:
    """Chunk-by-chunk state of `parse_multi_human`: semantic sums, mask scores, kept instances, human winners."""

    def __init__(
        self,
        class_logits: torch.Tensor,
        topk: int,
        num_parsing: int,
        output_size: tuple[int, int],
        paste_threshold: float | None,
    ) -> None:
        height, width = output_size
        device = class_logits.device
        self.num_parsing, self.output_size, self.paste_threshold = (
            num_parsing,
            output_size,
            paste_threshold,
        )
        self.class_probabilities = F.softmax(class_logits, dim=-1)[
            :, :num_parsing
        ]  # (Q, num_parsing)
        self.top_scores, self.top_labels, self.top_queries = select_topk(class_logits, topk)
        self.mask_scores = torch.zeros(class_logits.shape[0], dtype=torch.float32, device=device)
        self.semantic_shape = (num_parsing, height * width)
        self.semantic: torch.Tensor | None = None  # (C, H*W) sums, made by the first chunk
        self.best_human_logit: torch.Tensor | None = (
            None  # (H, W) running max of kept human logits (> 0)
        )
        self.best_human_query: torch.Tensor | None = (
            None  # (H, W) query holding that max, -1 = none
        )
        paste = paste_threshold is not None
        zeros = (lambda: torch.zeros(self.semantic_shape, device=device)) if paste else None
        self.pasted = zeros() if zeros else None
        self.paste_counts = zeros() if zeros else None
        self.entries_by_query: dict[int, list[int]] = {}
        for entry, query in enumerate(self.top_queries.tolist()):
            self.entries_by_query.setdefault(query, []).append(entry)
        self.kept_entries: list[tuple[int, float]] = []  # (top-k entry, score)
        self.packed_masks: dict[int, np.ndarray] = {}

    def add_chunk(self, start: int, logits: torch.Tensor) -> None:
        """Read queries start.. from their (q, H*W) logits at output size: semantic sums, scores, kept masks."""
        stop = start + logits.shape[0]
        probabilities = logits.sigmoid()  # (q, H*W)
        positive = logits > 0  # (q, H*W)
        if self.semantic is None:
            self.semantic = torch.zeros(self.semantic_shape, device=logits.device)
        self.semantic.addmm_(
            self.class_probabilities[start:stop].T, probabilities
        )  # (C, q) @ (q, HW)
        # From here on `probabilities` holds sigmoid(m) * [m > 0] (in place: no extra chunk-sized tensor).
        probabilities.masked_fill_(positive.logical_not(), 0.0)
        positive_counts = torch.count_nonzero(positive, dim=1).to(
            torch.float32
        )  # exact below 2**24 pixels
        self.mask_scores[start:stop] = probabilities.sum(1) / (positive_counts + MASK_SCORE_EPSILON)
        newly_kept = []
        for offset, query in enumerate(range(start, stop)):
            for entry in self.entries_by_query.get(query, ()):
                if self._read_entry(entry, query, logits[offset], probabilities[offset]):
                    newly_kept.append(offset)
        offsets = sorted(
            {offset for offset in newly_kept if start + offset not in self.packed_masks}
        )
        if (
            offsets
        ):  # one transfer and one packbits for the chunk; rows pack as each mask alone would
            packed = np.packbits(positive[offsets].cpu().numpy(), axis=1)
            for row, offset in enumerate(offsets):
                self.packed_masks[start + offset] = packed[row]

    def _read_entry(
        self, entry: int, query: int, logits: torch.Tensor, probabilities: torch.Tensor
    ) -> bool:
        """Score one top-k entry, paste it if asked; True if it is kept (its mask must then be stored)."""
        label = int(self.top_labels[entry])
        score, keep, is_human = self._score_entry(entry, query)
        if (
            self.paste_threshold is not None
            and label < self.num_parsing
            and bool(score >= self.paste_threshold)
        ):
            self._paste(label, float(score), probabilities)
        if not keep:
            return False
        self.kept_entries.append((entry, float(score)))
        if is_human:
            self._add_human(query, logits.reshape(self.output_size))
        return True

    def _score_entry(self, entry: int, query: int) -> tuple[torch.Tensor, bool, bool]:
        """One top-k entry's score (class x mask score, float32 as the reference), kept?, human?"""
        label = int(self.top_labels[entry])
        score = self.top_scores[entry] * self.mask_scores[query]
        is_human = label == self.num_parsing
        keep = (
            bool(score > HUMAN_SCORE_THRESHOLD)
            if is_human
            else (label != 0 and bool(score >= PART_SCORE_THRESHOLD))
        )
        return score, keep, is_human

    def keep_scored(self) -> tuple[list[int], set[int]]:
        """Keep entries from `mask_scores` set beforehand (the op path): the queries whose masks must be
        stored, ascending, and those of them that are kept humans."""
        stored: list[int] = []
        humans: set[int] = set()
        for query in sorted(self.entries_by_query):
            for entry in self.entries_by_query[query]:
                score, keep, is_human = self._score_entry(entry, query)
                if not keep:
                    continue
                self.kept_entries.append((entry, float(score)))
                if not stored or stored[-1] != query:
                    stored.append(query)
                if is_human:
                    humans.add(query)
        return stored, humans

    def add_humans(self, queries: list[int], logits: torch.Tensor) -> None:
        """Kept humans `queries` (ascending) claim their pixels from their (k, H, W) logits."""
        for row, query in enumerate(queries):
            self._add_human(query, logits[row])

    def _add_human(self, query: int, logits: torch.Tensor) -> None:
        """Let a kept human's (H, W) logits claim the pixels where they beat every earlier human and 0."""
        best_logit, best_query = self.best_human_logit, self.best_human_query
        if best_logit is None or best_query is None:
            best_logit = torch.zeros(self.output_size, dtype=torch.float32, device=logits.device)
            best_query = torch.full(self.output_size, -1, dtype=torch.int32, device=logits.device)
        better = logits > best_logit  # strict: ties keep the lower (earlier) query
        self.best_human_logit = torch.where(better, logits, best_logit)
        self.best_human_query = best_query.masked_fill_(better, query)

    def _paste(self, class_id: int, score: float, probabilities: torch.Tensor) -> None:
        """Average `sigmoid(mask) * score` into class `class_id` where it exceeds 0.5 (reference's pasting).

        `probabilities` may be zeroed where the mask logit is <= 0: such pixels (sigmoid <= 0.5) never paste.
        """
        pasted, counts = self._paste_buffers()
        weighted = probabilities.reshape(-1) * score  # (H*W,)
        selected = weighted > 0.5
        pasted[class_id] += torch.where(selected, weighted, torch.zeros_like(weighted))
        counts[class_id] += selected.to(torch.float32)

    def _paste_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pasted sums and counts (num_parsing, H*W); only when a paste threshold was given."""
        if self.pasted is None or self.paste_counts is None:
            raise RuntimeError("pasting needs a paste_threshold")
        return self.pasted, self.paste_counts

    def instances(self) -> list[Instance]:
        """The kept instances, by descending score (ties: earlier top-k entry first)."""
        instances = []
        for entry, score in sorted(self.kept_entries, key=lambda item: (-item[1], item[0])):
            query = int(self.top_queries[entry])
            label = int(self.top_labels[entry])
            instances.append(
                Instance(label, score, query, self.packed_masks[query], self.output_size)
            )
        return instances

    def topk(self) -> TopK:
        """The raw top-k list with the mask scores."""
        mask_scores = self.mask_scores[self.top_queries]
        return TopK(
            labels=self.top_labels.cpu().numpy().astype(np.int64),
            queries=self.top_queries.cpu().numpy().astype(np.int64),
            class_scores=self.top_scores.cpu().numpy().astype(np.float32),
            mask_scores=mask_scores.cpu().numpy().astype(np.float32),
            scores=(self.top_scores * mask_scores).cpu().numpy().astype(np.float32),
        )

    def semantic_outputs(self) -> np.ndarray | None:
        """The reference's pasted `semantic_outputs` (num_parsing, H, W), or None if not asked for."""
        if self.paste_threshold is None:
            return None
        pasted, counts = self._paste_buffers()
        return (
            (pasted / counts.clamp(min=1.0))
            .reshape(self.num_parsing, *self.output_size)
            .cpu()
            .numpy()
        )

    def winner(self) -> np.ndarray | None:
        """(H, W) int32 query of the winning kept human per pixel, -1 where none; None if no human was kept."""
        return None if self.best_human_query is None else self.best_human_query.cpu().numpy()


def select_topk(
    class_logits: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (query, class) pairs of softmax(class_logits)[:, :-1] flattened: scores, labels, queries."""
    class_scores = F.softmax(class_logits, dim=-1)[:, :-1]  # (Q, C)
    num_classes = class_scores.shape[1]
    flat_scores = class_scores.flatten()  # (Q*C,): index = query * C + class
    top_scores, top_indices = flat_scores.topk(min(topk, flat_scores.numel()), sorted=True)
    return top_scores, top_indices % num_classes, top_indices // num_classes


def check_sizes(
    padded_size: Sequence[int], image_size: Sequence[int], output_size: Sequence[int]
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """The three sizes as (height, width) pairs of positive ints, or ValueError."""
    output = check_size("output_size", output_size)
    return check_size("padded_size", padded_size), check_size("image_size", image_size), output


def check_multi_human(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    num_parsing: int,
    class_names: Sequence[str],
) -> None:
    """Raise ValueError unless the logits are those of a multi-human model with `num_parsing` classes."""
    check_prediction(class_logits, mask_logits)
    if class_logits.shape[1] != num_parsing + 2:
        raise ValueError(
            f"class_logits must have num_parsing + 2 = {num_parsing + 2} columns (parts, Human, no-object), "
            f"but got {class_logits.shape[1]}"
        )
    if len(class_names) < num_parsing:
        raise ValueError(
            f"class_names must name the {num_parsing} parsing classes, but got {len(class_names)}"
        )


def check_chunk_size(chunk_size: int | None, num_queries: int, padded_size, output_size) -> int:
    """`chunk_size`, or one picked from the memory budget if None; raise ValueError if < 1."""
    if chunk_size is None:
        chunk_size = automatic_chunk_size(num_queries, padded_size, output_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, but got {chunk_size}")
    return chunk_size


def read_mask_chunks(
    readout: _MultiHumanReadout,
    mask_logits: torch.Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    chunk_size: int,
) -> None:
    """Feed the (Q, h, w) mask logits to `readout`, resized to its output size `chunk_size` at once."""
    num_queries = mask_logits.shape[0]
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        logits = resize_mask_logits(
            mask_logits[start:stop], padded_size, image_size, readout.output_size
        )  # (q, H, W)
        readout.add_chunk(start, logits.reshape(stop - start, -1))  # (q, H*W)
        del logits


def read_with_chunks(
    readout: _MultiHumanReadout,
    mask_logits: torch.Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    chunk_size: int,
    keep_semantic: bool,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """The reference readout (PyTorch, chunk by chunk): label map and, if asked, the (C, H, W) semantic map."""
    read_mask_chunks(readout, mask_logits, padded_size, image_size, chunk_size)
    sums = readout.semantic
    if sums is None:  # no queries
        sums = torch.zeros(readout.semantic_shape, device=mask_logits.device)
    semantic = sums.reshape(readout.num_parsing, *readout.output_size)  # (C, H, W)
    label_map = semantic.argmax(0).to(torch.uint8).cpu().numpy()
    return label_map, semantic if keep_semantic else None


def read_with_op(
    readout: _MultiHumanReadout,
    mask_logits: torch.Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    chunk_size: int,
    keep_semantic: bool,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """The compiled readout (`ops.mask_readout`): label map, semantic map and mask scores of every query
    in one pass; then the kept queries' packed masks (`ops.mask_bits`, same taps) and the kept
    humans' claims from their logits resized as the reference does."""
    low_size = (int(mask_logits.shape[-2]), int(mask_logits.shape[-1]))
    taps = mask_taps(low_size, padded_size, image_size, readout.output_size)
    labels, semantic, score_sums, counts = ops.mask_readout(
        mask_logits, readout.class_probabilities, taps, keep_semantic
    )
    readout.mask_scores = score_sums.to(torch.float32) / (
        counts.to(torch.float32) + MASK_SCORE_EPSILON
    )
    queries, humans = readout.keep_scored()
    if queries:
        packed = ops.mask_bits(mask_logits[queries], taps).numpy()  # (k, ceil(H*W / 8))
        readout.packed_masks.update(zip(queries, packed, strict=True))
    human_queries = sorted(humans)
    for start in range(0, len(human_queries), chunk_size):
        chunk = human_queries[start : start + chunk_size]
        logits = resize_mask_logits(
            mask_logits[chunk], padded_size, image_size, readout.output_size
        )  # (k, H, W)
        readout.add_humans(chunk, logits)
    return labels.numpy(), semantic if keep_semantic else None


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
    """Multi-human readout: label map, kept instances, then persons and their parts (`worker.m2fp.persons`).

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
    check_multi_human(class_logits, mask_logits, num_parsing, class_names)
    padded_size, image_size, output_size = check_sizes(padded_size, image_size, output_size)
    chunk_size = check_chunk_size(chunk_size, class_logits.shape[0], padded_size, output_size)
    readout = _MultiHumanReadout(
        class_logits.float(), topk, num_parsing, output_size, paste_threshold
    )
    use_op = paste_threshold is None and ops.use_mask_readout(mask_logits, num_parsing)
    read = read_with_op if use_op else read_with_chunks  # pasting: only the reference pastes
    label_map, semantic = read(
        readout, mask_logits.float(), padded_size, image_size, chunk_size, keep_semantic_map
    )
    instances = readout.instances()
    names = class_names[:num_parsing]
    instance_map, persons = group_persons(
        label_map, instances, readout.winner(), num_parsing, names
    )
    return MultiHumanParsing(
        label_map=label_map,
        instance_map=instance_map,
        persons=persons,
        parts=describe_parts(instances, instance_map, len(persons), num_parsing, class_names),
        instances=instances,
        topk=readout.topk(),
        semantic_map=semantic.cpu().numpy() if semantic is not None else None,
        semantic_outputs=readout.semantic_outputs(),
    )


def single_human_semantic(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    padded_size: tuple[int, int],
    chunk_size: int,
) -> torch.Tensor:
    """The (C, Hp, Wp) semantic map at the padded input size, upsampling `chunk_size` queries at once."""
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    class_probabilities = F.softmax(class_logits.float(), dim=-1)[:, :-1]  # (Q, C)
    semantic = torch.zeros(
        (num_classes, padded_size[0] * padded_size[1]), device=class_logits.device
    )
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        chunk = mask_logits[start:stop].float()[None]  # (1, q, h, w)
        upsampled = F.interpolate(chunk, size=padded_size, mode="bilinear", align_corners=False)[
            0
        ]  # (q, Hp, Wp)
        semantic.addmm_(
            class_probabilities[start:stop].T, upsampled.reshape(stop - start, -1).sigmoid()
        )
    return semantic.reshape(num_classes, *padded_size)


def single_human_scores(
    sem_seg: torch.Tensor, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Label map, winning probability per pixel, present class ids and their mean scores."""
    label_map = sem_seg.argmax(0).to(torch.uint8).cpu().numpy()
    label_tensor = torch.from_numpy(label_map.astype(np.int64)).to(sem_seg.device)
    winning = (
        torch.gather(sem_seg, 0, label_tensor[None]).sigmoid()[0].double().cpu().numpy()
    )  # (H, W)
    sums = np.bincount(label_map.ravel(), weights=winning.ravel(), minlength=num_classes)
    counts = np.bincount(label_map.ravel(), minlength=num_classes)
    class_ids = np.flatnonzero(counts).astype(np.int64)
    return label_map, winning, class_ids, sums[class_ids] / (counts[class_ids] + 1.0)


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
    padded_size, image_size = (
        check_size("padded_size", padded_size),
        check_size("image_size", image_size),
    )
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    if len(class_names) < num_classes:
        raise ValueError(
            f"class_names must name the {num_classes} classes, but got {len(class_names)}"
        )
    chunk_size = check_chunk_size(chunk_size, num_queries, padded_size, padded_size)
    semantic = single_human_semantic(
        class_logits, mask_logits, padded_size, chunk_size
    )  # (C, Hp, Wp)
    sem_seg = resize_mask_logits(
        semantic, padded_size, image_size, output_size, crop_box
    )  # (C, H, W)
    # The map is already at padded size: resize_mask_logits' first resize is the identity there.
    label_map, winning, class_ids, class_scores = single_human_scores(sem_seg, num_classes)
    instance_map, persons = single_human_persons(label_map, winning, class_names[:num_classes])
    return SingleHumanParsing(
        label_map=label_map,
        instance_map=instance_map,
        persons=persons,
        parts=single_human_parts(label_map, class_ids, class_scores, class_names),
        class_ids=class_ids,
        class_scores=class_scores,
        sem_seg=sem_seg.cpu().numpy() if keep_sem_seg else None,
    )
