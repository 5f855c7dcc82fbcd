"""Sliced (SAHI-style) inference: small objects in large images, found tile by tile.

A 1280 px image letterboxed to a 256 px model shrinks a 16 px object to 3 px, below what the
detector learned. Slicing cuts the image into overlapping tiles, runs every tile (and, by
default, the whole image downscaled, for the large objects no tile holds whole) through THE
batch step (:func:`detectkit.predict.step.detect_batch`), shifts each tile's boxes by the tile's
origin and merges the duplicates found in the overlaps.

What comes from the ``sahi`` package (the ``slice`` extra) and what is ours, and why:

* the tile grid is ``sahi.slicing.get_slice_bboxes``, so ``--slice 640 --overlap 0.2`` cuts the
  tiles SAHI users know (the last row/column is moved back to end on the image border);
* NMM (greedy non-maximum merging: overlapping boxes become their union, with the best score;
  ``merge="nmm"``) is ``sahi.postprocess.combine.batched_greedy_nmm`` on the merged arrays;
* the model is NOT called through SAHI's ``get_sliced_prediction``: that runs one tile per
  forward pass through its own model wrappers and per-box Python objects. Here all tiles of a
  batch of images are letterboxed together and go through our batch step ``batch_size`` tiles at
  a time, with the model's own post-processing. NMS across tiles (the default) is torchvision's
  ``batched_nms`` for IoU, ours for IoS (no kernel exists), on tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from detectkit.data.letterbox import letterbox
from detectkit.errors import UserError
from detectkit.extras import missing_extra_message
from detectkit.predict.step import Detections, detect_batch, to_input

__all__ = ["SliceConfig", "tile_grid", "shift_boxes", "merge_detections", "detect_sliced"]

MERGES = ("nms", "nmm")
METRICS = ("iou", "ios")


@dataclass(frozen=True)
class SliceConfig:
    """How to slice: ``size`` (tile side in original pixels), ``overlap`` (fraction of the side
    shared by neighbouring tiles), ``merge`` (``"nms"``: the best of the matching boxes is kept;
    ``"nmm"``: they become their union box, SAHI's default, which scored 5 AP points lower in
    benchmarks/bench_slicing.py: a partial box grows its merged box), ``match_metric`` and
    ``match_threshold`` (when two boxes are one object: IoU, or intersection over the smaller box
    ``"ios"``, at or above the threshold), ``full_image`` (also predict the whole image downscaled, for large objects)."""

    size: int = 640
    overlap: float = 0.2
    merge: Literal["nms", "nmm"] = "nms"
    match_metric: Literal["iou", "ios"] = "ios"
    match_threshold: float = 0.5
    full_image: bool = True

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"slice size must be at least 32 pixels, got {self.size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"slice overlap must be in [0, 1), got {self.overlap}")
        if self.merge not in MERGES:
            raise ValueError(f"slice merge must be one of {', '.join(MERGES)}, got {self.merge!r}")
        if self.match_metric not in METRICS:
            raise ValueError(f"slice match_metric must be one of {', '.join(METRICS)}, got {self.match_metric!r}")
        if not 0.0 < self.match_threshold <= 1.0:
            raise ValueError(f"slice match_threshold must be in (0, 1], got {self.match_threshold}")


def _sahi() -> Any:
    """``sahi`` with its slicing and merging, or the one-line ``pip install 'detectkit[slice]'`` message."""
    try:
        import sahi.postprocess.combine
        import sahi.slicing
    except ImportError as e:
        raise UserError(missing_extra_message(e, "sliced inference") or f"sliced inference needs sahi: {e}") from e
    return sahi


def tile_grid(height: int, width: int, config: SliceConfig) -> np.ndarray:
    """``[T,4]`` tiles ``(x1, y1, x2, y2)`` in image pixels covering the image, neighbours sharing
    ``overlap`` of the tile side; an image smaller than a tile is one tile."""
    tiles = _sahi().slicing.get_slice_bboxes(
        height, width, slice_height=config.size, slice_width=config.size, auto_slice_resolution=False,
        overlap_height_ratio=config.overlap, overlap_width_ratio=config.overlap)
    return np.asarray(tiles, np.int64).reshape(-1, 4)


def shift_boxes(boxes: torch.Tensor, tile: Sequence[int]) -> torch.Tensor:
    """Boxes in a tile's pixels -> the image's pixels (the tile's top-left is its origin)."""
    x0, y0 = float(tile[0]), float(tile[1])
    return boxes + boxes.new_tensor([x0, y0, x0, y0])


def merge_detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, config: SliceConfig,
                     agnostic: bool = False, max_det: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One box per object from the tiles' boxes (each object was seen by every tile it lies in),
    best score first, at most ``max_det``. ``agnostic`` merges boxes of different classes too."""
    if boxes.shape[0] == 0:
        return boxes, scores, labels
    if config.merge == "nms":
        keep = _nms(boxes, scores, labels, config, agnostic)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    else:
        boxes, scores, labels = _nmm(boxes, scores, labels, config, agnostic)
    order = torch.argsort(scores, descending=True)[:max_det]
    return boxes[order], scores[order], labels[order]


def _nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, config: SliceConfig,
         agnostic: bool) -> torch.Tensor:
    from torchvision.ops import batched_nms, box_area

    groups = torch.zeros_like(labels) if agnostic else labels
    if config.match_metric == "iou":
        return batched_nms(boxes.float(), scores.float(), groups, config.match_threshold)
    # IoS has no torchvision kernel: the matching pairs, found a block of rows at a time (a full
    # N x N matrix over tiles x max_det boxes would take gigabytes), then greedy suppression over them
    order = torch.argsort(scores, descending=True)
    b, g = boxes[order].float(), groups[order]
    area = box_area(b)
    pairs = []
    for start in range(0, len(b), 512):
        rows = b[start:start + 512]
        inter = (torch.minimum(rows[:, None, 2:], b[None, :, 2:]) - torch.maximum(rows[:, None, :2], b[None, :, :2]))
        inter = inter.clamp(min=0).prod(-1)
        ios = inter / torch.minimum(area[start:start + 512, None], area[None, :]).clamp(min=1e-9)
        i = torch.arange(start, start + len(rows))[:, None]
        match = (ios >= config.match_threshold) & (g[start:start + 512, None] == g[None, :]) & (torch.arange(len(b)) > i)
        pairs.append(torch.nonzero(match) + torch.tensor([start, 0]))
    first, second = torch.cat(pairs).T.numpy()  # row-major: grouped by the better box, in score order
    alive = np.ones(len(b), bool)
    bounds = np.searchsorted(first, np.arange(len(b) + 1))
    for k in range(len(b)):
        if alive[k]:
            alive[second[bounds[k]:bounds[k + 1]]] = False
    return order[torch.from_numpy(alive)]


def _nmm(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, config: SliceConfig,
         agnostic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    combine = _sahi().postprocess.combine
    rows = torch.cat([boxes.float(), scores.float()[:, None], labels.float()[:, None]], 1).numpy()
    merge = combine.greedy_nmm if agnostic else combine.batched_greedy_nmm
    groups = merge(rows, match_metric=config.match_metric.upper(), match_threshold=config.match_threshold)
    keep = sorted(groups)
    out = np.empty((len(keep), 4), np.float32)
    for k, i in enumerate(keep):  # the union of a box and everything merged into it
        members = rows[[i, *groups[i]], :4]
        out[k] = [*members[:, :2].min(0), *members[:, 2:].max(0)]
    index = torch.as_tensor(keep, dtype=torch.long)
    return torch.from_numpy(out).to(boxes.dtype), scores[index], labels[index]


def detect_sliced(forward: Callable[[torch.Tensor], Any], images: Sequence[np.ndarray], config: SliceConfig,
                  settings: Any, batch_size: int = 8, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> list[Detections]:
    """Each image's :class:`Detections` (original pixels) from its tiles: every tile (and the
    full image when ``config.full_image``) letterboxed with ``settings`` (a
    :class:`~detectkit.predict.pipeline.PredictSettings`), ``batch_size`` tiles per forward
    through :func:`detect_batch`, shifted back, merged per image, ``settings.post.max_det`` kept."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    crops: list[tuple[int, tuple[int, int], np.ndarray]] = []  # (image index, tile origin, pixels)
    for n, image in enumerate(images):
        for x1, y1, x2, y2 in tile_grid(image.shape[0], image.shape[1], config).tolist():
            crops.append((n, (x1, y1), image[y1:y2, x1:x2]))
        if config.full_image:
            crops.append((n, (0, 0), image))
    found: list[list[Detections]] = [[] for _ in images]
    for start in range(0, len(crops), batch_size):
        chunk = crops[start:start + batch_size]
        padded = [letterbox(np.ascontiguousarray(pixels), size=settings.size, longest=settings.longest,
                            center=settings.center, pad_value=settings.pad_value) for _, _, pixels in chunk]
        dets = detect_batch(forward, to_input([p for p, _ in padded], device, dtype), [i for _, i in padded],
                            settings.post)
        for (n, origin, _), det in zip(chunk, dets):
            det.boxes = shift_boxes(det.boxes, origin)
            found[n].append(det)
    post = settings.post
    out = []
    for parts in found:
        boxes, scores, labels = merge_detections(
            torch.cat([d.boxes for d in parts]), torch.cat([d.scores for d in parts]),
            torch.cat([d.labels for d in parts]), config, agnostic=bool(post.agnostic), max_det=post.max_det)
        out.append(Detections(boxes, scores, labels, max((d.best_score for d in parts), default=0.0)))
    return out
