"""COCO mAP glue: detections in model-input pixels + batch ``meta`` -> torchmetrics in original pixels.

Scoring in original coordinates (not the letterboxed input) is what pycocotools does on the
COCO json, so our numbers are comparable with super-gradients' and with ``detectkit predict``'s
result files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics.detection import MeanAveragePrecision

from detectkit.data.letterbox import LetterboxInfo, unletterbox_boxes

__all__ = ["DedupMeanAveragePrecision", "build_map_metric", "to_original", "metric_inputs", "summarize_map", "SUMMARY_KEYS"]

SUMMARY_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")


class DedupMeanAveragePrecision(MeanAveragePrecision):
    """torchmetrics' COCO mAP whose cross-rank sync keeps each image once (by ``image_id``).

    Under DDP, Lightning's ``DistributedSampler`` pads the evaluation set so every rank gets the
    same number of images; without this the repeated images would be scored twice. The states
    are gathered as objects, so ranks may also hold different numbers of images (torchmetrics'
    own per-element gather needs equal counts), and images are ordered by id afterwards, so the
    result does not depend on the world size. Targets may carry ``image_id`` (else no dedup).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("image_ids", default=[], dist_reduce_fx=None)

    def update(self, preds: list[dict[str, torch.Tensor]], target: list[dict[str, Any]]) -> None:
        ids = [t.get("image_id") for t in target]
        super().update(preds, [{k: v for k, v in t.items() if k != "image_id"} for t in target])
        self.image_ids.extend(torch.tensor(-1 if i is None else int(i), device=self.device) for i in ids)

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        import torch.distributed as dist

        group = process_group or self.process_group
        n = len(self.image_ids)
        names = [k for k in self._defaults if isinstance(getattr(self, k), list) and len(getattr(self, k)) == n]
        local = {k: [t.detach().cpu() for t in getattr(self, k)] for k in names}
        parts: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, local, group=group)
        rows, seen = [], set()
        for part in parts:
            for i, img in enumerate(part["image_ids"]):
                key = int(img)
                if key >= 0 and key in seen:
                    continue
                seen.add(key)
                rows.append((key, part, i))
        rows.sort(key=lambda r: r[0])
        for k in names:
            setattr(self, k, [part[k][i].to(self.device) for _, part, i in rows])


def build_map_metric(max_detection_thresholds: Sequence[int] = (1, 10, 100)) -> MeanAveragePrecision:
    """COCO bbox mAP (faster_coco_eval backend, identical to pycocotools here) with per-class AP;
    DDP-safe (see :class:`DedupMeanAveragePrecision`)."""
    return DedupMeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        backend="faster_coco_eval",
        class_metrics=True,
        max_detection_thresholds=list(max_detection_thresholds),
    )


def letterbox_info(meta: dict[str, Any]) -> LetterboxInfo:
    """The ``LetterboxInfo`` of one image from its batch ``meta`` entry."""
    pad = meta.get("pad", (0, 0))
    h, w = meta["orig_size"]
    return LetterboxInfo(scale=float(meta.get("scale", 1.0)), pad_left=pad[0], pad_top=pad[1], orig_size=(int(h), int(w)))


def to_original(detections: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """``[N,6]`` detections (x1,y1,x2,y2,conf,cls) in input pixels -> same rows in original pixels."""
    out = detections.float().clone()
    out[:, :4] = unletterbox_boxes(out[:, :4], letterbox_info(meta))
    return out


def metric_inputs(
    detections: Sequence[torch.Tensor], metas: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Per-image preds/targets dicts for ``MeanAveragePrecision.update``, in original pixels."""
    preds, targets = [], []
    for det, meta in zip(detections, metas):
        det = to_original(det.detach(), meta)
        preds.append({"boxes": det[:, :4], "scores": det[:, 4], "labels": det[:, 5].long()})
        boxes = torch.as_tensor(meta["boxes"], dtype=torch.float32, device=det.device).reshape(-1, 4)
        labels = torch.as_tensor(meta["labels"], dtype=torch.long, device=det.device).reshape(-1)
        crowd = meta.get("iscrowd")
        crowd = torch.zeros_like(labels) if crowd is None else torch.as_tensor(crowd, device=det.device).reshape(-1).long()
        targets.append({"boxes": boxes, "labels": labels, "iscrowd": crowd, "image_id": meta.get("image_id")})
    return preds, targets


def summarize_map(result: dict[str, torch.Tensor], class_names: Sequence[str]) -> dict[str, float]:
    """Scalar summary + ``AP/<class name>`` per class (classes absent from the data are skipped)."""
    out = {k: float(result[k]) for k in SUMMARY_KEYS if k in result}
    per_class = result.get("map_per_class")
    classes = result.get("classes")
    if per_class is not None and classes is not None and per_class.numel() == classes.numel():
        for c, ap in zip(classes.reshape(-1).tolist(), per_class.reshape(-1).tolist()):
            name = class_names[c] if 0 <= c < len(class_names) else str(c)
            if ap >= 0:  # -1 = class absent from the ground truth
                out[f"AP/{name}"] = float(ap)
    return out
