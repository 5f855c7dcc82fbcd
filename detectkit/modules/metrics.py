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

__all__ = ["build_map_metric", "to_original", "metric_inputs", "summarize_map", "SUMMARY_KEYS"]

SUMMARY_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")


def build_map_metric(max_detection_thresholds: Sequence[int] = (1, 10, 100)) -> MeanAveragePrecision:
    """COCO bbox mAP (faster_coco_eval backend, identical to pycocotools here) with per-class AP."""
    return MeanAveragePrecision(
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
        targets.append({"boxes": boxes, "labels": labels, "iscrowd": crowd})
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
