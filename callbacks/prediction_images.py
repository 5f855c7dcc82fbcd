"""``LogValidationPredictions``: see what the detector does, not only its mAP.

Per validation epoch: the first ``num_images`` validation images with ground-truth and
predicted boxes (W&B: interactive box overlays via ``wandb.Image(boxes=...)``; MLflow:
``log_image`` PNGs; TensorBoard: ``add_image``), and two matplotlib figures computed from all
validation predictions: per-class precision-recall curves at IoU 0.5 (COCO-style 101-point
precision from faster-coco-eval) and a confusion matrix (with a background row/column).

The predictions are read from the module's ``val_map`` metric states before the module computes
and resets it (callback hooks run before the module's), gathered across ranks with torchmetrics'
own sync, so the figures cover the whole validation set under DDP.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torchvision.ops import box_iou

__all__ = ["LogValidationPredictions", "confusion_matrix", "pr_curves"]

log = logging.getLogger(__name__)

_GT_COLOR = (40, 200, 40)
_PRED_COLOR = (230, 40, 40)
_MIN_SIDE = 320  # drawn images are enlarged (integer factor) up to about this side


# ---------------------------------------------------------------------------- computations
def confusion_matrix(
    preds: Sequence[dict[str, torch.Tensor]],
    targets: Sequence[dict[str, torch.Tensor]],
    num_classes: int,
    conf: float = 0.25,
    iou: float = 0.5,
) -> np.ndarray:
    """``[C+1, C+1]`` counts, rows = predicted class, columns = true class; index ``C`` is
    background (row C: missed objects, column C: false detections). Greedy matching by IoU,
    highest-confidence detections first, each ground truth used once."""
    m = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    bg = num_classes
    for p, t in zip(preds, targets):
        keep = p["scores"] >= conf
        pb, ps, pl_ = p["boxes"][keep].float(), p["scores"][keep], p["labels"][keep].long()
        tb, tl = t["boxes"].float().reshape(-1, 4), t["labels"].long().reshape(-1)
        used = torch.zeros(len(tl), dtype=torch.bool)
        if len(pb) and len(tb):
            ious = box_iou(pb, tb)
        for i in torch.argsort(ps, descending=True).tolist():
            j_best = -1
            if len(tb):
                cand = ious[i].clone()
                cand[used] = -1
                j = int(cand.argmax())
                if cand[j] >= iou:
                    j_best = j
            if j_best >= 0:
                used[j_best] = True
                m[int(pl_[i]), int(tl[j_best])] += 1
            else:
                m[int(pl_[i]), bg] += 1
        for j in torch.nonzero(~used).flatten().tolist():
            m[bg, int(tl[j])] += 1
    return m


def pr_curves(
    preds: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """COCO precision at IoU 0.5 (all areas, most detections): ``recall [101]``,
    ``precision [K, 101]`` (-1 where undefined) and the class ids of the K rows."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval",
                                  class_metrics=True, extended_summary=True)
    metric.update(list(preds), list(targets))
    res = metric.compute()
    precision = res["precision"]  # [T, R, K, A, M]
    t50 = int(torch.argmin((torch.as_tensor(metric.iou_thresholds) - 0.5).abs()))
    prec = precision[t50, :, :, 0, -1].T.cpu().numpy()  # [K, R]
    classes = res["classes"].reshape(-1).tolist()
    recall = np.asarray(metric.rec_thresholds, dtype=np.float64)
    return recall, prec, classes


def _figure_pr(recall: np.ndarray, prec: np.ndarray, classes: list[int], names: Sequence[str]) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for row, c in zip(prec, classes):
        valid = row >= 0
        if valid.any():
            name = names[c] if 0 <= c < len(names) else str(c)
            ap = float(row[valid].mean())
            ax.plot(recall[valid], row[valid], label=f"{name} AP50={ap:.2f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="PR @ IoU 0.5")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def _figure_confusion(m: np.ndarray, names: Sequence[str]) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = list(names) + ["background"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1.0 + 0.6 * len(labels)), dpi=100)
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set(xlabel="true", ylabel="predicted", title="confusion (conf 0.25, IoU 0.5)")
    fig.tight_layout()
    return fig


def _figure_to_array(fig: Any) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def _draw(image: np.ndarray, gt: torch.Tensor, gt_labels: torch.Tensor, det: torch.Tensor,
          names: Sequence[str]) -> np.ndarray:
    """Ground truth in green (captions inside the bottom edge), predictions in red with class and
    confidence, through the one drawer; small inputs are enlarged so the captions stay readable."""
    from detectkit.predict.draw import draw_boxes

    k = max(1, _MIN_SIDE // max(image.shape[:2]))
    if k > 1:
        image = np.ascontiguousarray(image.repeat(k, axis=0).repeat(k, axis=1))  # nearest-neighbour
        gt, det = gt * k, det.clone()
        det[:, :4] *= k
    out = draw_boxes(image, gt, gt_labels, None, names, color=_GT_COLOR, line_width=1, caption_below=True)
    return draw_boxes(out, det[:, :4], det[:, 5].long(), det[:, 4], names, color=_PRED_COLOR, line_width=1)


def _name(names: Sequence[str], c: int) -> str:
    return names[c] if 0 <= c < len(names) else str(c)


# ---------------------------------------------------------------------------- the callback
class LogValidationPredictions(Callback):
    """Images with boxes, PR curves and a confusion matrix at each validation end.

    Args:
        num_images: validation images drawn per epoch (from the first batches, rank 0).
        conf: drawing / confusion-matrix confidence threshold.
        iou: IoU to match a prediction to a ground truth in the confusion matrix.
        every_n_epochs: log every N validation epochs (the last one of ``fit`` included).
        plots: also log the PR-curve and confusion-matrix figures.
        metric_attr: the module's ``MeanAveragePrecision`` attribute holding validation states.
    """

    def __init__(self, num_images: int = 8, conf: float = 0.25, iou: float = 0.5, every_n_epochs: int = 1,
                 plots: bool = True, metric_attr: str = "val_map") -> None:
        self.num_images, self.conf, self.iou = num_images, conf, iou
        self.every_n_epochs, self.plots, self.metric_attr = max(1, every_n_epochs), plots, metric_attr
        self._samples: list[dict[str, Any]] = []
        self.logged_epochs: list[int] = []

    def _active(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0 or last or not trainer.training

    # ------------------------------------------------------------------ hooks
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples = []

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.is_global_zero or len(self._samples) >= self.num_images or not self._active(trainer):
            return
        images = batch["images"]
        n = min(self.num_images - len(self._samples), images.shape[0])
        images = images[:n]
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        dets = pl_module.detect(images, pl_module.val_postprocess.replace(conf=self.conf))
        targets = batch["targets"]
        for i in range(n):
            rows = targets[targets[:, 0] == i]
            self._samples.append({
                "image": (images[i].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy(),
                "gt": rows[:, 2:6].float().cpu(),
                "gt_labels": rows[:, 1].long().cpu(),
                "det": dets[i].float().cpu(),
                "id": batch["meta"][i].get("image_id", i) if "meta" in batch else i,
            })

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer):
            return
        names = list(getattr(pl_module, "class_names", []))
        preds, targets = self._gather_predictions(trainer, pl_module) if self.plots else (None, None)
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        for i, s in enumerate(self._samples):
            self._log_sample(trainer, s, i, step, names)
        if preds is not None and len(preds):
            try:
                recall, prec, classes = pr_curves(preds, targets)
                self._log_figure(trainer, _figure_pr(recall, prec, classes, names), "val/pr_curve", step)
            except Exception as e:
                log.warning("LogValidationPredictions: PR curve failed: %s", e)
            m = confusion_matrix(preds, targets, max(len(names), 1), self.conf, self.iou)
            self._log_figure(trainer, _figure_confusion(m, names or ["0"]), "val/confusion_matrix", step)
        self.logged_epochs.append(int(trainer.current_epoch))
        self._samples = []

    # ------------------------------------------------------------ the work
    def _gather_predictions(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[list, list] | tuple[None, None]:
        """Per-image preds/targets from the metric states, synced across ranks (all ranks call)."""
        metric = getattr(pl_module, self.metric_attr, None)
        if metric is None or not hasattr(metric, "detection_box"):
            return None, None
        with metric.sync_context(should_sync=trainer.world_size > 1, should_unsync=True):
            preds = [{"boxes": b.cpu(), "scores": s.cpu(), "labels": lab.cpu()}
                     for b, s, lab in zip(metric.detection_box, metric.detection_scores, metric.detection_labels)]
            targets = [{"boxes": b.cpu(), "labels": lab.cpu(), "iscrowd": c.cpu()}
                       for b, lab, c in zip(metric.groundtruth_box, metric.groundtruth_labels,
                                            metric.groundtruth_crowds)]
        return preds, targets

    def _log_sample(self, trainer: pl.Trainer, s: dict[str, Any], i: int, step: int, names: list[str]) -> None:
        drawn = None
        for logger in trainer.loggers:
            kind = type(logger).__name__
            try:
                if "Wandb" in kind:
                    logger.experiment.log({f"val/predictions/{i}": self._wandb_image(s, names),
                                           "trainer/global_step": step})
                    continue
                drawn = drawn if drawn is not None else _draw(s["image"], s["gt"], s["gt_labels"], s["det"], names)
                if "MLFlow" in kind:
                    logger.experiment.log_image(logger.run_id, drawn,
                                                artifact_file=f"val_images/epoch{trainer.current_epoch:03d}_{i}.png")
                elif "TensorBoard" in kind:
                    logger.experiment.add_image(f"val/predictions/{i}", drawn, step, dataformats="HWC")
            except Exception as e:
                log.warning("LogValidationPredictions: could not log an image to %s: %s", kind, e)

    def _wandb_image(self, s: dict[str, Any], names: list[str]) -> Any:
        import wandb

        labels = {c: n for c, n in enumerate(names)}

        def box(xyxy: list[float], c: int, score: float | None) -> dict[str, Any]:
            d: dict[str, Any] = {"position": {"minX": xyxy[0], "minY": xyxy[1], "maxX": xyxy[2], "maxY": xyxy[3]},
                                 "domain": "pixel", "class_id": int(c), "box_caption": _name(names, int(c))}
            if score is not None:
                d["scores"] = {"confidence": float(score)}
                d["box_caption"] += f" {score:.2f}"
            return d

        pred = [box(r[:4], int(r[5]), r[4]) for r in s["det"].tolist()]
        gt = [box(b, int(c), None) for b, c in zip(s["gt"].tolist(), s["gt_labels"].tolist())]
        return wandb.Image(s["image"], boxes={"predictions": {"box_data": pred, "class_labels": labels},
                                              "ground_truth": {"box_data": gt, "class_labels": labels}},
                           caption=f"image {s['id']}")

    def _log_figure(self, trainer: pl.Trainer, fig: Any, tag: str, step: int) -> None:
        import matplotlib.pyplot as plt

        try:
            for logger in trainer.loggers:
                kind = type(logger).__name__
                try:
                    if "Wandb" in kind:
                        import wandb

                        logger.experiment.log({tag: wandb.Image(_figure_to_array(fig)), "trainer/global_step": step})
                    elif "MLFlow" in kind:
                        name = tag.replace("/", "_")
                        logger.experiment.log_figure(logger.run_id, fig,
                                                     f"plots/{name}_epoch{trainer.current_epoch:03d}.png")
                    elif "TensorBoard" in kind:
                        logger.experiment.add_figure(tag, fig, step, close=False)
                except Exception as e:
                    log.warning("LogValidationPredictions: could not log %s to %s: %s", tag, kind, e)
        finally:
            plt.close(fig)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"logged_epochs": list(self.logged_epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.logged_epochs = list(state_dict.get("logged_epochs", []))
