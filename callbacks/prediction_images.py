"""``LogValidationPredictions``: see what the detector does, not only its mAP.

Per validation epoch: the first ``num_images`` validation images with ground-truth and
predicted boxes (W&B: interactive box overlays via ``wandb.Image(boxes=...)``; MLflow:
``log_image`` PNGs; TensorBoard: ``add_image``), and two matplotlib figures computed from all
validation predictions: per-class precision-recall curves at IoU 0.5 (COCO-style 101-point
precision from faster-coco-eval) and a confusion matrix (with a background row/column).

The figures come from the evaluation that produced ``val/map`` (the module's
``COCOMeanAveragePrecision.last_result``: all ranks' images, PR arrays and confusion matrix from
one faster-coco-eval run), read in ``on_validation_end`` after the module computed it: no second
evaluation, no extra sync. :mod:`detectkit.modules.curves` derives what the plots need; the
figure and drawing helpers below are shared with :class:`detectkit.callbacks.RunReport`, which
writes the same plots into the run folder.
"""

from __future__ import annotations

import io
import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from detectkit.modules.curves import ValidationCurves, normalize_confusion, validation_curves
from detectkit.modules.metrics import COCOEvalResult, COCOMeanAveragePrecision

__all__ = ["LogValidationPredictions", "collect_samples", "confusion_figure", "draw_sample", "image_grid",
           "last_evaluation", "pr_figure", "save_figure"]

log = logging.getLogger(__name__)

_GT_COLOR = (40, 200, 40)
_PRED_COLOR = (230, 40, 40)
_MIN_SIDE = 320  # drawn images are enlarged (integer factor) up to about this side


# ---------------------------------------------------------------------------- figures and drawings
# Shared by LogValidationPredictions (tracker images) and RunReport (run-folder files).
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display on training machines; a no-op when already chosen
    import matplotlib.pyplot as plt

    return plt


def last_evaluation(pl_module: pl.LightningModule, metric_attr: str = "val_map") -> COCOEvalResult | None:
    """The evaluation behind the module's last logged mAP (None before any, or for another metric)."""
    metric = getattr(pl_module, metric_attr, None)
    return metric.last_result if isinstance(metric, COCOMeanAveragePrecision) else None


def pr_figure(curves: ValidationCurves, names: Sequence[str]) -> Any:
    """Per-class precision-recall curves at IoU 0.5, each labelled with its AP50."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    recall, aps = curves.recall, curves.ap50
    for row, c in zip(curves.precision, curves.classes):
        valid = row >= 0
        if valid.any():
            ax.plot(recall[valid], row[valid], label=f"{_name(names, c)} AP50={aps[int(c)]:.3f}")
    if aps:
        ax.plot([], [], " ", label=f"all classes mAP50={np.mean(list(aps.values())):.3f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="PR @ IoU 0.5")
    if aps:  # beside the axes: with many classes a legend inside would cover the curves
        fig.set_size_inches(5 + 2.2 * (1 + len(aps) // 30), 4)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  ncol=1 + len(aps) // 30, frameon=False)
    fig.tight_layout()
    return fig


def confusion_figure(m: np.ndarray, names: Sequence[str], normalize: bool = False, conf: float = 0.25,
                     iou: float = 0.5, note: str | None = None) -> Any:
    """A ``[C+1, C+1]`` confusion matrix (rows predicted, columns true, last row/column:
    background); ``normalize`` shows each true-class column as fractions; ``note`` is printed under
    it (why a matrix is empty)."""
    plt = _pyplot()
    labels = list(names) + ["background"]
    values = normalize_confusion(m) if normalize else m
    side = max(4.5, 1.2 + 0.6 * len(labels))
    fig, ax = plt.subplots(figsize=(side + 0.3, side), dpi=100)
    ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    for (i, j), v in np.ndenumerate(values):
        text = (f"{v:.2f}" if v else "") if normalize else str(v)
        ax.text(j, i, text, ha="center", va="center", fontsize=7,
                color="white" if normalize and v > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    kind = "\nnormalised per true class" if normalize else ""
    ax.set(xlabel="true", ylabel="predicted")
    ax.set_title(f"confusion matrix (conf {conf:g}, IoU {iou:g}){kind}", fontsize=9)
    if note:
        text = "\n".join(textwrap.wrap(note, int(12 * (side + 0.3))))
        fig.text(0.5, 0.01, text, ha="center", va="bottom", fontsize=7, color="darkred")
        fig.tight_layout(rect=(0, 0.02 + 0.12 * (text.count("\n") + 1) / side, 1, 1))
        return fig
    fig.tight_layout()
    return fig


def save_figure(fig: Any, path: str | Path) -> None:
    """Write ``fig`` as an image file and free it (pyplot keeps every open figure alive)."""
    plt = _pyplot()
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)


def _figure_to_array(fig: Any) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def draw_sample(image: np.ndarray, gt: torch.Tensor, gt_labels: torch.Tensor, det: torch.Tensor,
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


@torch.no_grad()
def collect_samples(pl_module: pl.LightningModule, batch: dict[str, Any], n: int, conf: float) -> list[dict[str, Any]]:
    """The first ``n`` images of a validation batch with their ground truth and the module's
    detections at ``conf`` (input pixels, uint8 HWC images on the CPU), ready for drawing; ``best_score``
    is the image's highest score at any threshold (what an empty picture's hint reports)."""
    images = batch["images"][:n]
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    dets = pl_module.detect(images, pl_module.val_postprocess.replace(conf=conf))
    every = dets
    if any(len(d) == 0 for d in dets):  # only then: the scores under the threshold, for the hint
        every = pl_module.detect(images, pl_module.val_postprocess.replace(conf=0.0))
    targets = batch["targets"]
    out = []
    for i in range(images.shape[0]):
        rows = targets[targets[:, 0] == i]
        out.append({
            "image": (images[i].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy(),
            "gt": rows[:, 2:6].float().cpu(),
            "gt_labels": rows[:, 1].long().cpu(),
            "det": dets[i].float().cpu(),
            "best_score": float(every[i][:, 4].max()) if len(every[i]) else 0.0,
            "id": batch["meta"][i].get("image_id", i) if "meta" in batch else i,
        })
    return out


def image_grid(tiles: Sequence[np.ndarray], columns: int | None = None, gap: int = 4) -> np.ndarray:
    """Tile HWC uint8 images (any sizes) into one image, row by row, on a white background."""
    if not tiles:
        raise ValueError("image_grid needs at least one image")
    columns = columns or int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / columns))
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    grid = np.full((rows * th + (rows - 1) * gap, columns * tw + (columns - 1) * gap, 3), 255, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, columns)
        y, x = r * (th + gap), c * (tw + gap)
        grid[y:y + t.shape[0], x:x + t.shape[1]] = t[..., :3]
    return grid


# ---------------------------------------------------------------------------- the callback
class LogValidationPredictions(Callback):
    """Images with boxes, PR curves and a confusion matrix at each validation end.

    Args:
        num_images: validation images drawn per epoch (from the first batches, rank 0).
        conf: drawing / confusion-matrix confidence threshold.
        iou: IoU to match a prediction to a ground truth in the confusion matrix.
        every_n_epochs: log every N validation epochs (the last one of ``fit`` included).
        plots: also log the PR-curve and confusion-matrix figures.
        metric_attr: the module's ``COCOMeanAveragePrecision`` attribute whose evaluation is plotted.
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
        n = min(self.num_images - len(self._samples), batch["images"].shape[0])
        self._samples.extend(collect_samples(pl_module, batch, n, self.conf))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the module computed (and logged) this validation's mAP: plot that evaluation."""
        if not self._active(trainer) or not trainer.is_global_zero:
            return
        names = list(getattr(pl_module, "class_names", []))
        step = trainer.global_step
        for i, s in enumerate(self._samples):
            self._log_sample(trainer, s, i, step, names)
        result = last_evaluation(pl_module, self.metric_attr) if self.plots else None
        if result is not None and result.num_images:
            curves = validation_curves(result, len(names), self.conf, self.iou)
            names = names + [str(c) for c in range(len(names), len(curves.instances))]
            self._log_figure(trainer, pr_figure(curves, names), "val/pr_curve", step)
            self._log_figure(trainer, confusion_figure(curves.confusion, names, conf=self.conf, iou=self.iou),
                             "val/confusion_matrix", step)
        self.logged_epochs.append(int(trainer.current_epoch))
        self._samples = []

    # ------------------------------------------------------------ the work
    def _log_sample(self, trainer: pl.Trainer, s: dict[str, Any], i: int, step: int, names: list[str]) -> None:
        drawn = None
        for logger in trainer.loggers:
            kind = type(logger).__name__
            try:
                if "Wandb" in kind:
                    logger.experiment.log({f"val/predictions/{i}": self._wandb_image(s, names),
                                           "trainer/global_step": step})
                    continue
                drawn = drawn if drawn is not None else draw_sample(s["image"], s["gt"], s["gt_labels"], s["det"], names)
                if "MLFlow" in kind:
                    logger.experiment.log_image(logger.run_id, drawn,
                                                artifact_file=f"val_images/epoch{trainer.current_epoch + 1:03d}_{i}.png")
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
                                                     f"plots/{name}_epoch{trainer.current_epoch + 1:03d}.png")
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
