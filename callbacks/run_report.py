"""``RunReport``: a run folder a user can read without any tracker.

Written into the run folder (rank 0), refreshed as the fit goes:

- ``results.csv``: one row per training epoch: ``epoch`` (1-based, as the progress lines count),
  ``step``, the epoch means of every ``train/*`` value the module logs (losses and their
  components), the validation summary of that epoch (``val/map``, ``val/map_50``, ..., then each
  class's AP50-95 as ``val/AP/<class>``; empty when the epoch did not validate), the
  learning rate of each parameter group (``lr/<group name>``) and ``epoch_time`` (seconds, the
  epoch's validation included);
- ``results.png``: those columns as curves over the epochs (one panel each);
- ``PR_curve.png``: per-class precision-recall at IoU 0.5 from the last validation;
- ``confusion_matrix.png``: normalised per true class, with a background row and column;
- ``val_batch_pred.jpg``: a grid of the first validation images with ground truth (green) and
  predictions (red);
- when no prediction passes ``conf``, the grid and the confusion matrix carry the one-line hint of
  ``detect``/``serve`` (:func:`detectkit.predict.step.no_detections_hint`: the best score seen and
  the threshold to try), not a blank picture;
- at the end of ``fit``, the final per-class table (instances, AP50, AP50-95) and the summary
  printed to stdout (a rich table when rich is installed, plain text otherwise).

The run folder is where Lightning's own loggers keep a run: ``trainer.log_dir`` for the CSV and
TensorBoard loggers (``<save_dir>/<name>/version_<n>``), ``<save_dir>/<name>/<version>`` for the
others (where ``ModelCheckpoint`` puts that run's checkpoints: MLflow and W&B share one
``save_dir`` between runs), and ``default_root_dir`` without a logger.

The PR curve, the per-class AP50 and the confusion matrix come from the evaluation that produced
``val/map`` (the module's ``COCOMeanAveragePrecision.last_result``, every rank's images), via
:mod:`detectkit.modules.curves`; the figures and drawings are ``LogValidationPredictions``' (one
implementation).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from detectkit.callbacks.prediction_images import (
    collect_samples,
    confusion_figure,
    draw_sample,
    image_grid,
    last_evaluation,
    pr_figure,
    save_figure,
)
from lightning.pytorch.callbacks import Callback
from PIL import Image

from detectkit.integrations.tracking import run_dir
from detectkit.modules.curves import validation_curves
from detectkit.predict.draw import caption
from detectkit.predict.step import no_detections_hint
from detectkit.utils.files import atomic_write

__all__ = ["RunReport", "run_folder", "metrics_table"]

log = logging.getLogger(__name__)

#: how the report's hint names its threshold (RunReport is a trainer default; a recipe lists it to change it)
_CONF_OPTION = "RunReport(conf={}) in trainer.callbacks"

#: validation summary keys, in the order results.csv and the table show them
_VAL_ORDER = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


def run_folder(trainer: pl.Trainer) -> Path:
    """The folder of this run (the one rule, :func:`detectkit.integrations.tracking.run_dir`), the same on every
    rank (broadcast from rank 0: every rank must call it)."""
    return Path(trainer.strategy.broadcast(str(run_dir(trainer))))


def metrics_table(summary: dict[str, float], per_class: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the final table: one row per class, then ``all``."""
    header = ["class", "images", "instances", "AP50", "AP50-95"]

    def f(v: float | None) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) or v < 0 else f"{v:.3f}"

    rows = [[str(r["name"]), str(r["images"]), str(r["instances"]), f(r.get("ap50")), f(r.get("ap"))] for r in per_class]
    rows.append(["all", str(summary.get("images", "-")), str(sum(r["instances"] for r in per_class)),
                 f(summary.get("map_50")), f(summary.get("map"))])
    return header, rows


def _plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


class RunReport(Callback):
    """results.csv, curves, PR/confusion PNGs, a validation grid and the final table (see module doc).

    Args:
        num_images: validation images drawn into ``val_batch_pred.jpg`` (the first batches).
        conf: confidence threshold of the drawn predictions and of the confusion matrix.
        iou: IoU that matches a prediction to a ground truth in the confusion matrix.
        plots: write the PNG/JPEG files (``results.csv`` and the table are always written).
        print_table: print the final metrics table at the end of ``fit``.
        metric_attr: the module's validation ``COCOMeanAveragePrecision`` attribute.
        hide: logged ``train/*`` diagnostics kept in ``results.csv`` but not plotted in ``results.png``.
    """

    def __init__(self, num_images: int = 16, conf: float = 0.25, iou: float = 0.5, plots: bool = True,
                 print_table: bool = True, metric_attr: str = "val_map",
                 hide: Sequence[str] = ("num_fg", "normalizer", "nonfinite_steps")) -> None:
        self.num_images, self.conf, self.iou, self.hide = num_images, conf, iou, tuple(hide)
        self.plots, self.print_table, self.metric_attr = plots, print_table, metric_attr
        self.rows: list[dict[str, Any]] = []
        self.dir: Path | None = None
        self._epoch_start = 0.0
        self._samples: list[dict[str, Any]] = []
        self._val: dict[str, float] | None = None  # the summary of this epoch's validation
        self._last_val: dict[str, float] = {}
        self._val_epoch = 0
        self._val_images = 0
        self._per_class: list[dict[str, Any]] = []
        #: the last validation's no-detections hint (None when some prediction passed ``conf``)
        self.hint: str | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.dir = run_folder(trainer)  # every rank: the path is broadcast
        if trainer.is_global_zero:
            self.dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- training
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._val = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self.dir is None:
            return
        metrics = trainer.callback_metrics
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        for k in sorted(metrics):
            if k.startswith("train/") and k.endswith("_epoch"):
                row[k[: -len("_epoch")]] = float(metrics[k])
        for k, v in (self._val or {}).items():
            row[f"val/{k}"] = v
        for i, opt in enumerate(trainer.optimizers):
            for j, group in enumerate(opt.param_groups):
                name = str(group.get("name", f"group{j}"))
                row[f"lr/{name}" if len(trainer.optimizers) == 1 else f"lr/{i}/{name}"] = float(group["lr"])
        row["epoch_time"] = round(time.perf_counter() - self._epoch_start, 3)
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        self._write_csv()
        if self.plots:
            self._try(self._plot_results, "results.png")

    # -------------------------------------------------------------- validation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if (not self.plots or trainer.sanity_checking or not trainer.is_global_zero
                or len(self._samples) >= self.num_images):
            return
        n = min(self.num_images - len(self._samples), batch["images"].shape[0])
        self._samples.extend(collect_samples(pl_module, batch, n, self.conf))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The module has computed and logged this validation's mAP by now: record its summary and
        plot the evaluation behind it (``metric.last_result``: every rank's images, no second run)."""
        if trainer.sanity_checking or not trainer.is_global_zero or self.dir is None:
            return
        metrics = trainer.callback_metrics
        val = {k[4:]: float(v) for k, v in metrics.items() if k.startswith("val/")}
        order = {k: i for i, k in enumerate(_VAL_ORDER)}
        # the summary first, then the other values, the per-class APs (AP/<class>) last
        self._val = dict(sorted(val.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0].startswith("AP/"),
                                                             kv[0])))
        self._last_val = dict(self._val)
        self._val_epoch = trainer.current_epoch + 1
        names = list(getattr(pl_module, "class_names", []))
        result = last_evaluation(pl_module, self.metric_attr)
        if result is not None and result.num_images:
            curves = validation_curves(result, len(names), self.conf, self.iou)
            names = names + [str(c) for c in range(len(names), len(curves.instances))]
            self._val_images = curves.num_images
            self._per_class = []
            for c, name in enumerate(names):
                if curves.instances[c] or c in curves.ap50:
                    ap = metrics.get(f"val/AP/{name}")
                    self._per_class.append({"name": name, "images": int(curves.images[c]),
                                            "instances": int(curves.instances[c]), "ap50": curves.ap50.get(c),
                                            "ap": None if ap is None else float(ap)})
            scores = result.detections[:, 5]  # those above the validation conf (e.g. 0.001)
            # the drawn images' scores at any threshold: the best seen even when none reached that conf
            best = max([float(scores.max(initial=0.0))] + [s["best_score"] for s in self._samples])
            self.hint = None if (scores >= self.conf).any() else self._hint(best, curves.num_images)
            if self.plots:
                note = self.hint
                self._try(lambda: save_figure(pr_figure(curves, names), self.dir / "PR_curve.png"), "PR_curve.png")
                self._try(lambda: save_figure(confusion_figure(curves.confusion, names, normalize=True, conf=self.conf,
                                                               iou=self.iou, note=note),
                                              self.dir / "confusion_matrix.png"),
                          "confusion_matrix.png")
        if self.plots and self._samples:
            self._try(lambda: self._grid(names), "val_batch_pred.jpg")
        self._samples = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.print_table or not self._last_val:
            return
        header, rows = metrics_table({**self._last_val, "images": self._val_images}, self._per_class)
        title = f"final validation (epoch {self._val_epoch}); run folder: {self.dir}"
        hint = f"\n{self.hint}" if self.hint else ""
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            print(f"{title}\n{_plain_table(header, rows)}{hint}", flush=True)
            return
        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for r in rows:
            table.add_row(*r)
        Console().print(table)
        if hint:
            print(hint.strip(), flush=True)

    # ----------------------------------------------------------------- writing
    def _hint(self, best_score: float, images: int) -> str:
        return no_detections_hint(self.conf, best_score, images, option=_CONF_OPTION)

    def _grid(self, names: list[str]) -> None:
        tiles = [draw_sample(s["image"], s["gt"], s["gt_labels"], s["det"], names) for s in self._samples]
        grid = image_grid(tiles)
        if not any(len(s["det"]) for s in self._samples):
            grid = caption(grid, self._hint(max(s["best_score"] for s in self._samples), len(self._samples)))
        atomic_write(self.dir / "val_batch_pred.jpg", lambda tmp: Image.fromarray(grid).save(tmp, "JPEG", quality=90))

    def _write_csv(self) -> None:
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        rank = {"epoch": 0, "step": 1, "train": 2, "val": 3, "lr": 4, "epoch_time": 5}
        cols.sort(key=lambda c: rank.get(c.split("/", 1)[0], 5))  # stable: keeps each group's order

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=cols)
                w.writeheader()
                for r in sorted(self.rows, key=lambda r: r["epoch"]):
                    w.writerow({k: _fmt(r.get(k)) for k in cols})

        atomic_write(self.dir / "results.csv", write)  # a reader never sees a half-written file

    def _plot_results(self) -> None:
        from detectkit.callbacks.prediction_images import _pyplot

        rows = sorted(self.rows, key=lambda r: r["epoch"])
        epochs = [r["epoch"] for r in rows]
        train = [k for k in rows[-1] if k.startswith("train/") and k[len("train/"):] not in self.hide]
        val = [k for k in ("val/map_50", "val/map", "val/mar_100") if any(k in r for r in rows)]
        lrs = sorted({k for r in rows for k in r if k.startswith("lr/")})
        panels: list[tuple[str, list[str]]] = [(k, [k]) for k in train] + [(k, [k]) for k in val]
        if lrs:
            panels.append(("learning rate", lrs))
        plt = _pyplot()
        cols = min(4, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), dpi=100, squeeze=False)
        from matplotlib.ticker import MaxNLocator

        for ax, (title, keys) in zip(axes.flat, panels):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            for k in keys:
                pts = [(e, r[k]) for e, r in zip(epochs, rows) if r.get(k) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker=".", label=k.split("/", 1)[-1] if len(keys) > 1 else None)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            if len(keys) > 1:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        save_figure(fig, self.dir / "results.png")

    def _try(self, fn: Any, what: str) -> None:
        try:
            fn()
        except Exception as e:  # a plot must never end a fit
            log.warning("RunReport: could not write %s: %s", what, e)

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, np.generic | torch.Tensor):
        return f"{float(v):.6g}"
    return v
