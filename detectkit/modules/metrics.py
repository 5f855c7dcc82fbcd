"""COCO mAP for validation: detections in model-input pixels + batch ``meta`` -> one faster-coco-eval run.

Scoring in original coordinates (not the letterboxed input) is what pycocotools does on the
COCO json, so our numbers are comparable with super-gradients' and with ``detectkit predict``'s
result files.

Why not torchmetrics' ``MeanAveragePrecision`` (which we used before, with the same
faster-coco-eval backend): on a 5,000-image COCO-sized set it spent about 4x what its backend
needs (issue 16). It keeps a list of small tensors per image and converts each of them to
Python lists at ``compute``, and with ``class_metrics=True`` it rebuilds the COCO datasets and
runs ``evaluate``/``accumulate`` once more per class (torchmetrics 1.9, ``detection/helpers.py``)
for per-class AP that the first run's ``eval['precision']`` already holds. Here each batch is
appended as one array, and ``compute`` builds faster-coco-eval's ``COCO`` objects straight from
the concatenated arrays (no ``loadRes``, which also writes a polygon per detection), runs
``evaluate``/``accumulate`` once and reads everything from that one run: the COCO summary,
per-class AP/AR, the PR arrays (:attr:`COCOEvalResult.precision`) and, from the same
accumulated detections, the confusion matrix. It is still a torchmetrics ``Metric`` so that
Lightning moves, resets and syncs it like any other.

Detections per image: COCO results keep at most 100 detections per image (the detection
challenge's rule, what torchmetrics warned about). The training recipe's NMS keeps up to
``val_max_det=300``; this metric keeps each image's top ``max(max_detection_thresholds)`` (100)
by score before scoring and evaluates with COCO's ``maxDets=(1, 10, 100)``. COCOeval's own cap is
per image *and class*, so on images with more than 100 detections our number is the one
pycocotools gives on a result file that obeys the 100-per-image rule (slightly lower than
scoring all 300); on images with at most 100 detections the two are identical.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from detectkit.data.letterbox import LetterboxInfo, unletterbox_boxes

__all__ = [
    "COCOEvalResult",
    "COCOMeanAveragePrecision",
    "SUMMARY_KEYS",
    "build_map_metric",
    "evaluate_coco",
    "metric_inputs",
    "summarize_map",
    "to_original",
]

SUMMARY_KEYS = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)

# state layouts (one array per update call)
_DET_COLS = 6  # x1 y1 x2 y2 score label (float32, original pixels)
_GT_COLS = 7  # x1 y1 x2 y2 label iscrowd area (float64; area NaN = use the box area)


def _noop(*_: Any, **__: Any) -> None:
    return None


# ---------------------------------------------------------------------------- the result
@dataclass(eq=False)
class COCOEvalResult:
    """Everything one COCOeval run produced, plus the detections it scored.

    Arrays follow COCOeval: ``precision``/``scores`` ``[T, R, K, A, M]`` and ``recall`` ``[T, K, A, M]``
    with T = ``iou_thresholds``, R = ``rec_thresholds`` (101 points), K = ``classes`` (dataset
    labels, ascending), A = ``area_labels`` (all, small, medium, large), M = ``max_dets``;
    ``-1`` where undefined (e.g. a class without ground truth). ``detections`` ``[N, 7]``
    (image, x1, y1, x2, y2, score, label) and ``groundtruths`` ``[G, 8]`` (image, x1, y1, x2, y2,
    label, iscrowd, area) are the merged, de-duplicated rows in original pixels; ``image`` indexes
    ``image_ids`` (dataset ids, ascending; -1 where the caller gave none).
    """

    stats: dict[str, float]
    precision: np.ndarray
    recall: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    iou_thresholds: np.ndarray
    rec_thresholds: np.ndarray
    area_labels: tuple[str, ...]
    max_dets: tuple[int, ...]
    detections: np.ndarray = field(repr=False)
    groundtruths: np.ndarray = field(repr=False)
    image_ids: np.ndarray = field(repr=False)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def _iou_index(self, iou: float) -> int:
        hits = np.flatnonzero(np.isclose(self.iou_thresholds, iou))
        if not len(hits):
            raise ValueError(f"IoU {iou} is not one of the evaluated thresholds {self.iou_thresholds.tolist()}")
        return int(hits[0])

    def _area_index(self, area: str) -> int:
        if area not in self.area_labels:
            raise ValueError(f"area {area!r} is not one of {self.area_labels}")
        return self.area_labels.index(area)

    def _maxdet_index(self, max_dets: int | None) -> int:
        if max_dets is None:
            return len(self.max_dets) - 1
        if max_dets not in self.max_dets:
            raise ValueError(f"max_dets {max_dets} is not one of {self.max_dets}")
        return self.max_dets.index(max_dets)

    def ap_per_class(self, iou: float | None = None, area: str = "all", max_dets: int | None = None) -> np.ndarray:
        """``[K]`` AP over IoU 0.50:0.95 (or at one ``iou``); -1 for classes without ground truth."""
        p = self.precision[:, :, :, self._area_index(area), self._maxdet_index(max_dets)]
        if iou is not None:
            p = p[self._iou_index(iou)][None]
        return _masked_mean(p.transpose(2, 0, 1).reshape(len(self.classes), p.shape[0] * p.shape[1]))

    def ar_per_class(self, area: str = "all", max_dets: int | None = None) -> np.ndarray:
        """``[K]`` recall averaged over IoU 0.50:0.95; -1 for classes without ground truth."""
        r = self.recall[:, :, self._area_index(area), self._maxdet_index(max_dets)]
        return _masked_mean(r.T)

    def pr_curve(self, iou: float = 0.5, area: str = "all", max_dets: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """COCO's interpolated precision at one IoU: ``recall [R]``, ``precision [K, R]`` (-1 where
        undefined) and the class label of each of the K rows."""
        prec = self.precision[self._iou_index(iou), :, :, self._area_index(area), self._maxdet_index(max_dets)]
        return self.rec_thresholds.copy(), prec.T.copy(), [int(c) for c in self.classes]

    def confusion_matrix(self, num_classes: int | None = None, conf: float = 0.25, iou: float = 0.5) -> np.ndarray:
        """``[C+1, C+1]`` counts from the scored detections: rows = predicted class, columns = true
        class, index ``C`` = background (row C: missed objects, column C: false detections).

        Per image, detections with score >= ``conf`` are matched greedily (highest score first,
        any class) to the unused non-crowd ground truth of highest IoU >= ``iou``. Like COCOeval,
        crowd regions are no objects to find: an unmatched detection lying inside one (intersection
        over its own area >= ``iou``) is not counted as a false detection.
        """
        labels_seen = np.concatenate([self.detections[:, 6], self.groundtruths[:, 5]]).astype(np.int64)
        c = int(num_classes) if num_classes is not None else int(labels_seen.max(initial=-1)) + 1
        if len(labels_seen) and (labels_seen.min() < 0 or labels_seen.max() >= c):
            raise ValueError(f"labels span {labels_seen.min()}..{labels_seen.max()}, outside 0..{c - 1}")
        m = np.zeros((c + 1, c + 1), dtype=np.int64)
        dets = self.detections[self.detections[:, 5] >= conf]
        gts = self.groundtruths
        d_split = _split_by_image(dets[:, 0], self.num_images)
        g_split = _split_by_image(gts[:, 0], self.num_images)
        for i in range(self.num_images):
            d, g = dets[d_split[i]:d_split[i + 1]], gts[g_split[i]:g_split[i + 1]]
            crowd = g[:, 6] > 0
            gt, gc = g[~crowd], g[crowd]
            gt_labels = gt[:, 5].astype(np.int64)
            used = np.zeros(len(gt), dtype=bool)
            if len(d):
                d = d[np.argsort(-d[:, 5], kind="stable")]
                ious = _box_iou(d[:, 1:5], gt[:, 1:5])
                ioa = _box_ioa(d[:, 1:5], gc[:, 1:5])
                for k, row in enumerate(ious):
                    pred = int(d[k, 6])
                    cand = np.where(used, -1.0, row)
                    j = int(cand.argmax()) if len(cand) else -1
                    if j >= 0 and cand[j] >= iou:
                        used[j] = True
                        m[pred, gt_labels[j]] += 1
                    elif not (ioa.shape[1] and ioa[k].max() >= iou):
                        m[pred, c] += 1
            np.add.at(m[c], gt_labels[~used], 1)
        return m

    def to_dict(self) -> dict[str, torch.Tensor]:
        """torchmetrics-style result: the scalar ``stats`` plus ``classes``, ``map_per_class`` and
        ``mar_{max}_per_class`` (what :func:`summarize_map` and older callers read)."""
        out = {k: torch.tensor(v, dtype=torch.float32) for k, v in self.stats.items()}
        out["classes"] = torch.as_tensor(self.classes, dtype=torch.int32)
        out["map_per_class"] = torch.as_tensor(self.ap_per_class(), dtype=torch.float32)
        out[f"mar_{self.max_dets[-1]}_per_class"] = torch.as_tensor(self.ar_per_class(), dtype=torch.float32)
        return out


def _masked_mean(rows: np.ndarray) -> np.ndarray:
    """Mean of each row over entries > -1 (COCOeval's rule), -1 where there is none."""
    valid = rows > -1
    n = valid.sum(axis=1)
    total = np.where(valid, rows, 0.0).sum(axis=1)
    return np.where(n > 0, total / np.maximum(n, 1), -1.0)


def _split_by_image(image_col: np.ndarray, n_images: int) -> np.ndarray:
    """Row offsets ``[n_images + 1]`` of rows grouped by image (rows are sorted by image)."""
    return np.searchsorted(image_col, np.arange(n_images + 1), side="left")


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    inter = _intersection(a, b)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _box_ioa(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the area of ``a`` (COCO's IoU against a crowd region)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    inter = _intersection(a, b)
    return np.where(area_a > 0, inter / np.where(area_a > 0, area_a, 1.0), 0.0)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


# ---------------------------------------------------------------------------- one COCOeval run
def evaluate_coco(
    detections: np.ndarray,
    groundtruths: np.ndarray,
    image_ids: np.ndarray,
    max_dets: Sequence[int] = (1, 10, 100),
) -> COCOEvalResult:
    """:func:`_evaluate_coco` with Python's cyclic garbage collector paused.

    COCO's API wants one dict per box (half a million on COCO val at 100 detections an image),
    and faster-coco-eval's ``evaluate`` adds a list per (image, class) pair. None of them form
    reference cycles, but each allocation burst triggers collections that re-walk every live
    dict: measured 2-3x the time of building them. Reference counting still frees everything."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _evaluate_coco(detections, groundtruths, image_ids, max_dets)
    finally:
        if was_enabled:
            gc.enable()


def _evaluate_coco(
    detections: np.ndarray,
    groundtruths: np.ndarray,
    image_ids: np.ndarray,
    max_dets: Sequence[int],
) -> COCOEvalResult:
    """Run faster-coco-eval once on merged rows (layouts as in :class:`COCOEvalResult`, rows grouped
    by image in ascending image order, detections already capped per image).

    The ``COCO`` objects are built from the arrays directly: the COCO image id is the row's image
    index, and the categories are the labels present in either array (a class without ground truth
    scores -1 and is left out of every mean, exactly as with pycocotools).
    """
    from faster_coco_eval import COCO, COCOeval_faster

    max_dets = tuple(sorted(int(m) for m in max_dets))
    n_images = len(image_ids)
    classes = np.unique(np.concatenate([detections[:, 6], groundtruths[:, 5]]).astype(np.int64))
    params_probe = COCOeval_faster(iouType="bbox", print_function=_noop).params
    area_labels = tuple(params_probe.areaRngLbl)
    T, R, K, A, M = len(params_probe.iouThrs), len(params_probe.recThrs), len(classes), len(area_labels), len(max_dets)
    empty = COCOEvalResult(
        stats={}, precision=-np.ones((T, R, K, A, M)), recall=-np.ones((T, K, A, M)), scores=-np.ones((T, R, K, A, M)),
        classes=classes, iou_thresholds=np.asarray(params_probe.iouThrs), rec_thresholds=np.asarray(params_probe.recThrs),
        area_labels=area_labels, max_dets=max_dets, detections=detections, groundtruths=groundtruths, image_ids=image_ids,
    )
    if not len(groundtruths) or not n_images:  # COCOeval has nothing to score against: every value undefined
        empty.stats = _stats_from(empty)
        return empty

    categories = [{"id": int(c)} for c in classes.tolist()]
    images = [{"id": i} for i in range(n_images)]

    g = groundtruths
    g_w, g_h = g[:, 3] - g[:, 1], g[:, 4] - g[:, 2]
    g_area = np.where(np.isnan(g[:, 7]), g_w * g_h, g[:, 7])
    g_bbox = np.stack([g[:, 1], g[:, 2], g_w, g_h], axis=1).tolist()
    gt_anns = [
        {"id": k, "image_id": im, "category_id": c, "bbox": b, "area": a, "iscrowd": cr}
        for k, (im, c, b, a, cr) in enumerate(
            zip(g[:, 0].astype(np.int64).tolist(), g[:, 5].astype(np.int64).tolist(), g_bbox, g_area.tolist(),
                g[:, 6].astype(np.int64).tolist()),
            start=1,  # annotation id 0 means "unmatched" inside COCOeval
        )
    ]
    d = detections.astype(np.float64)
    d_w, d_h = d[:, 3] - d[:, 1], d[:, 4] - d[:, 2]
    d_bbox = np.stack([d[:, 1], d[:, 2], d_w, d_h], axis=1).tolist()
    dt_anns = [
        {"id": k, "image_id": im, "category_id": c, "bbox": b, "area": a, "score": s, "iscrowd": 0}
        for k, (im, c, b, a, s) in enumerate(
            zip(d[:, 0].astype(np.int64).tolist(), d[:, 6].astype(np.int64).tolist(), d_bbox, (d_w * d_h).tolist(),
                d[:, 5].tolist()),
            start=1,
        )
    ]
    coco_gt, coco_dt = COCO(print_function=_noop), COCO(print_function=_noop)
    coco_gt.dataset = {"images": images, "annotations": gt_anns, "categories": categories}
    coco_dt.dataset = {"images": images, "annotations": dt_anns, "categories": categories}
    coco_gt.createIndex()
    coco_dt.createIndex()

    ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=_noop)
    ev.params.maxDets = list(max_dets)
    ev.params.imgIds = list(range(n_images))
    ev.params.catIds = classes.tolist()
    ev.evaluate()
    ev.accumulate()
    result = COCOEvalResult(
        stats={}, precision=np.asarray(ev.eval["precision"]), recall=np.asarray(ev.eval["recall"]),
        scores=np.asarray(ev.eval["scores"]), classes=classes, iou_thresholds=np.asarray(ev.params.iouThrs),
        rec_thresholds=np.asarray(ev.params.recThrs), area_labels=tuple(ev.params.areaRngLbl), max_dets=max_dets,
        detections=detections, groundtruths=groundtruths, image_ids=image_ids,
    )
    result.stats = _stats_from(result)
    return result


def _stats_from(r: COCOEvalResult) -> dict[str, float]:
    """COCOeval.summarize's numbers (mean over defined entries, -1 when none), named like torchmetrics.

    Read from the arrays rather than ``summarize()``'s positional ``stats`` vector, whose layout
    shifts with the number of ``maxDets``; the rule (mean of entries > -1) is COCOeval's."""

    def mean(a: np.ndarray) -> float:
        v = a[a > -1]
        return float(v.mean()) if v.size else -1.0

    top = len(r.max_dets) - 1
    t50, t75 = r._iou_index(0.5), r._iou_index(0.75)
    stats = {
        "map": mean(r.precision[:, :, :, 0, top]),
        "map_50": mean(r.precision[t50, :, :, 0, top]),
        "map_75": mean(r.precision[t75, :, :, 0, top]),
    }
    for a, name in enumerate(r.area_labels[1:], start=1):
        stats[f"map_{name}"] = mean(r.precision[:, :, :, a, top])
    for m, md in enumerate(r.max_dets):
        stats[f"mar_{md}"] = mean(r.recall[:, :, 0, m])
    for a, name in enumerate(r.area_labels[1:], start=1):
        stats[f"mar_{name}"] = mean(r.recall[:, :, a, top])
    return stats


# ---------------------------------------------------------------------------- the metric
class COCOMeanAveragePrecision(Metric):
    """COCO bbox mAP accumulated per batch, gathered across ranks, scored by one faster-coco-eval run.

    ``update`` takes torchmetrics' detection format (per image ``boxes`` xyxy / ``scores`` /
    ``labels``; targets ``boxes`` / ``labels`` and optional ``iscrowd``, ``area``, ``image_id``) and
    stores the batch as one array per field on the CPU, each image's detections cut to its top
    ``max(max_detection_thresholds)`` by score (see the module docstring).

    ``compute`` returns torchmetrics-style tensors (``map``, ``map_50``, ``map_75``, ``map_small``,
    ``map_medium``, ``map_large``, ``mar_1``, ``mar_10``, ``mar_100``, ``mar_small``, ``mar_medium``,
    ``mar_large``, ``classes``, ``map_per_class``, ``mar_100_per_class``) and keeps the whole run in
    :attr:`last_result` (a :class:`COCOEvalResult`: PR arrays, confusion matrix). The value is
    cached until the next ``update``/``reset``, so a callback that calls ``compute()`` (or
    :meth:`pr_curve` / :meth:`confusion_matrix`) before the module logs costs no second run.
    Under DDP ``compute`` is collective: every rank must call it.

    DDP: Lightning's ``DistributedSampler`` pads the evaluation set so every rank gets the same
    number of images; the gathered images are kept once each by ``image_id`` (first occurrence)
    and ordered by id, so the result does not depend on the world size. Ranks may hold different
    numbers of images (the states are gathered as objects). Images without ``image_id`` are never
    de-duplicated and come after the others in arrival order.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, max_detection_thresholds: Sequence[int] = (1, 10, 100), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_dets = tuple(sorted(int(m) for m in max_detection_thresholds))
        if not self.max_dets or self.max_dets[0] < 1:
            raise ValueError(f"max_detection_thresholds must be positive integers, got {max_detection_thresholds}")
        self.last_result: COCOEvalResult | None = None
        for name in ("dets", "det_counts", "gts", "gt_counts", "image_ids"):
            self.add_state(name, default=[], dist_reduce_fx=None)

    @property
    def max_per_image(self) -> int:
        return self.max_dets[-1]

    # ------------------------------------------------------------------ accumulate
    def update(self, preds: Sequence[Any], target: Sequence[dict[str, Any]], letterboxed: bool = False) -> None:
        """One batch. ``preds`` per image: a torchmetrics dict (``boxes`` xyxy, ``scores``, ``labels``)
        or an ``[N, 6]`` tensor of rows (x1, y1, x2, y2, score, label) as NMS returns them.
        ``target`` per image: ``boxes`` xyxy, ``labels`` and optional ``iscrowd``, ``area``,
        ``image_id`` (a torchmetrics target, or the batch ``meta`` entry, which holds them).

        ``letterboxed=True``: the predicted boxes are in model-input pixels and each target carries
        its letterbox (``scale``, ``pad``, ``orig_size``, as the batch ``meta`` does); they are mapped
        back to original pixels here. The validation step's path (``DetectionModule._eval_step``).

        One concatenation and one device transfer per batch, the letterbox undone on numpy views:
        no per-image tensors or dicts are kept (what torchmetrics' metric cost, issue 16).
        """
        if len(preds) != len(target):
            raise ValueError(f"{len(preds)} predictions for {len(target)} targets")
        if not len(preds):
            return
        rows = [_pred_rows(p, i) for i, p in enumerate(preds)]
        dets = torch.cat(rows).cpu().numpy()
        counts = np.asarray([len(r) for r in rows], dtype=np.int64)
        if letterboxed:
            offsets = np.concatenate([[0], np.cumsum(counts)])
            for i, meta in enumerate(target):
                if counts[i]:
                    view = dets[offsets[i]:offsets[i + 1], :4]
                    view[:] = unletterbox_boxes(view, letterbox_info(meta))
        self._append(dets, counts, target)

    def _append(self, dets: np.ndarray, counts: np.ndarray, targets: Sequence[dict[str, Any]]) -> None:
        dets, counts = _keep_top(dets, counts, self.max_per_image)
        gts, gt_counts, ids = _target_rows(targets)
        self.dets.append(torch.from_numpy(dets))
        self.det_counts.append(torch.from_numpy(counts))
        self.gts.append(torch.from_numpy(gts))
        self.gt_counts.append(torch.from_numpy(gt_counts))
        self.image_ids.append(torch.from_numpy(ids))

    def _local_arrays(self) -> dict[str, np.ndarray]:
        """The states as one array each (empty arrays of the right shape when there are none)."""
        shapes = {"dets": (_DET_COLS, np.float32), "gts": (_GT_COLS, np.float64)}
        out = {}
        for name in ("dets", "det_counts", "gts", "gt_counts", "image_ids"):
            parts = [t.cpu().numpy() for t in getattr(self, name)]
            if name in shapes:
                cols, dtype = shapes[name]
                out[name] = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros((0, cols), dtype)
            else:
                out[name] = np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)
        return out

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        """Gather every rank's arrays as objects (ranks may hold different numbers of images);
        de-duplication and ordering happen in ``compute``."""
        import torch.distributed as dist

        group = process_group or self.process_group
        parts: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, self._local_arrays(), group=group)
        for name in ("dets", "det_counts", "gts", "gt_counts", "image_ids"):
            setattr(self, name, [torch.from_numpy(part[name]) for part in parts])

    # ------------------------------------------------------------------ score
    def compute(self) -> dict[str, torch.Tensor]:
        dets, gts, image_ids = _merge(self._local_arrays())
        self.last_result = evaluate_coco(dets, gts, image_ids, self.max_dets)
        return self.last_result.to_dict()

    def result(self) -> COCOEvalResult:
        """The :class:`COCOEvalResult` of the current states (computes once; collective under DDP)."""
        self.compute()
        assert self.last_result is not None
        return self.last_result

    def pr_curve(self, iou: float = 0.5, area: str = "all") -> tuple[np.ndarray, np.ndarray, list[int]]:
        """``recall [101]``, ``precision [K, 101]``, class labels: see :meth:`COCOEvalResult.pr_curve`."""
        return self.result().pr_curve(iou=iou, area=area)

    def confusion_matrix(self, num_classes: int | None = None, conf: float = 0.25, iou: float = 0.5) -> np.ndarray:
        """``[C+1, C+1]`` from the same detections: see :meth:`COCOEvalResult.confusion_matrix`."""
        return self.result().confusion_matrix(num_classes=num_classes, conf=conf, iou=iou)


def _pred_rows(p: Any, i: int) -> torch.Tensor:
    """One image's predictions as float32 ``[N, 6]`` rows."""
    if isinstance(p, dict):
        b, s, lab = (torch.as_tensor(p[k]).detach() for k in ("boxes", "scores", "labels"))
        b, s, lab = b.reshape(-1, 4).float(), s.reshape(-1, 1).float(), lab.reshape(-1, 1).float()
        if not (len(b) == len(s) == len(lab)):
            raise ValueError(f"prediction {i}: {len(b)} boxes, {len(s)} scores, {len(lab)} labels")
        return torch.cat([b, s, lab], 1)
    p = torch.as_tensor(p).detach()
    if p.ndim != 2 or p.shape[1] != 6:
        raise ValueError(f"prediction {i}: expected [N, 6] rows (x1, y1, x2, y2, score, label), got {tuple(p.shape)}")
    return p.float()


def _array(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _target_rows(targets: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground truth of a batch -> rows ``[G, 7]`` (x1 y1 x2 y2 label iscrowd area; area NaN = box
    area), boxes per image and image ids (-1 = none)."""
    parts, counts, ids = [], np.zeros(len(targets), np.int64), np.full(len(targets), -1, np.int64)
    for i, t in enumerate(targets):
        b = _array(t["boxes"], np.float64).reshape(-1, 4)
        n = len(b)
        rows = np.empty((n, _GT_COLS), np.float64)
        rows[:, :4] = b
        for col, key, default in ((4, "labels", None), (5, "iscrowd", 0.0), (6, "area", np.nan)):
            v = t.get(key)
            if v is None and default is not None:
                rows[:, col] = default
                continue
            if v is None:
                raise ValueError(f"target {i}: no {key!r}")
            v = _array(v, np.float64).reshape(-1)
            if len(v) != n:
                raise ValueError(f"target {i}: {n} boxes but {len(v)} {key}")
            rows[:, col] = v
        parts.append(rows)
        counts[i] = n
        if t.get("image_id") is not None:
            ids[i] = int(t["image_id"])
    gts = np.concatenate(parts) if parts else np.zeros((0, _GT_COLS), np.float64)
    return gts, counts, ids


def _keep_top(dets: np.ndarray, counts: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's top ``cap`` rows by score (rows grouped by image); a stable sort, so that ties
    keep their order exactly as COCOeval's own mergesort truncation does."""
    if not len(counts) or counts.max() <= cap:
        return dets, counts
    image = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((-dets[:, 4], image))
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(order)) - starts[image[order]]
    return dets[order[rank < cap]], np.minimum(counts, cap)


def _merge(a: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gathered batches -> (detections [N,7], groundtruths [G,8], image_ids [I]): each image id
    once (first occurrence), images in ascending id order, rows grouped by image."""
    ids = a["image_ids"]
    n = len(ids)
    keep = ids < 0
    _, first = np.unique(ids, return_index=True)
    keep[first] = True  # first occurrence of each id (the -1 entry among them is already kept)
    kept = np.flatnonzero(keep)
    key = np.where(ids[kept] < 0, np.iinfo(np.int64).max, ids[kept])
    kept = kept[np.argsort(key, kind="stable")]
    position = np.full(n, -1, dtype=np.int64)
    position[kept] = np.arange(len(kept))

    def rows(data: np.ndarray, counts: np.ndarray) -> np.ndarray:
        if len(counts) != n or counts.sum() != len(data):
            raise RuntimeError(f"metric states out of step: {n} images, {len(counts)} counts, {len(data)} rows")
        img = position[np.repeat(np.arange(n), counts)]
        sel = np.flatnonzero(img >= 0)
        sel = sel[np.argsort(img[sel], kind="stable")]
        return np.concatenate([img[sel, None].astype(data.dtype), data[sel]], axis=1)

    return rows(a["dets"], a["det_counts"]), rows(a["gts"], a["gt_counts"]), ids[kept]


def build_map_metric(max_detection_thresholds: Sequence[int] = (1, 10, 100)) -> COCOMeanAveragePrecision:
    """The validation/test mAP of :class:`~detectkit.modules.detector.DetectionModule`: COCO bbox
    mAP with per-class AP from one faster-coco-eval run (identical to pycocotools), DDP-safe."""
    return COCOMeanAveragePrecision(max_detection_thresholds=max_detection_thresholds)


# ---------------------------------------------------------------------------- batch glue
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
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """Per-image preds/targets dicts for :meth:`COCOMeanAveragePrecision.update`, in original pixels."""
    preds, targets = [], []
    for det, meta in zip(detections, metas):
        det = to_original(det.detach(), meta)
        preds.append({"boxes": det[:, :4], "scores": det[:, 4], "labels": det[:, 5].long()})
        targets.append({"boxes": meta["boxes"], "labels": meta["labels"], "iscrowd": meta.get("iscrowd"),
                        "area": meta.get("area"), "image_id": meta.get("image_id")})
    return preds, targets


def summarize_map(result: dict[str, torch.Tensor], class_names: Sequence[str]) -> dict[str, float]:
    """Scalar summary + ``AP/<class name>`` per class (classes absent from the ground truth are skipped)."""
    out = {k: float(result[k]) for k in SUMMARY_KEYS if k in result}
    per_class = result.get("map_per_class")
    classes = result.get("classes")
    if per_class is not None and classes is not None and per_class.numel() == classes.numel():
        for c, ap in zip(classes.reshape(-1).tolist(), per_class.reshape(-1).tolist()):
            name = class_names[c] if 0 <= c < len(class_names) else str(c)
            if ap >= 0:  # -1 = class absent from the ground truth
                out[f"AP/{name}"] = float(ap)
    return out
