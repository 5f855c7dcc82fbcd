"""Lightning prediction writer: COCO results JSON and annotated images in the run directory.

It writes through the same parts as ``detectkit predict``: :func:`detectkit.predict.writers.coco_rows`
(the one category-id rule), :func:`detectkit.data.images.read_image` (the one decoder) and
:func:`detectkit.predict.draw.draw_boxes` (the one drawer).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from detectkit.data.images import ImageReadError, read_image
from detectkit.predict.draw import draw_boxes
from detectkit.predict.step import no_detections_hint
from detectkit.predict.writers import category_ids_of, coco_rows, write_coco_results

__all__ = ["DetectionWriter"]

log = logging.getLogger(__name__)


class DetectionWriter(BasePredictionWriter):
    """Writes ``predictions.json`` (COCO results) and ``images/<name>`` with the detections drawn,
    under ``output_dir`` (default: the run's log dir + ``/predictions``).

    Category ids: the model's ``category_ids`` (from its checkpoint), else the datamodule's, else
    ``label + 1`` (see :mod:`detectkit.predict.writers`).
    """

    def __init__(self, output_dir: str | None = None, save_images: bool = True, max_images: int | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.save_images = save_images
        self.max_images = max_images
        self._results: list[dict[str, Any]] = []
        self._n_images = 0
        self._seen = 0  # images predicted this epoch
        self._best = 0.0  # their best score before the threshold
        self._dir: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.output_dir is not None:
            self._dir = Path(self.output_dir)
        else:
            base = trainer.log_dir or trainer.default_root_dir
            self._dir = Path(base) / "predictions"

    @property
    def directory(self) -> Path | None:
        return self._dir

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._results, self._n_images, self._seen, self._best = [], 0, 0, 0.0
        assert self._dir is not None
        self._dir.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        cat_ids = category_ids_of(pl_module, trainer.datamodule)
        names = list(getattr(pl_module, "class_names", []))
        for item in prediction:
            meta, boxes = item["meta"], item["boxes"].numpy()
            self._seen += 1
            self._best = max(self._best, float(item.get("best_score", 0.0)))
            scores, labels = item["scores"].numpy(), item["labels"].numpy()
            self._results.extend(coco_rows(int(meta["image_id"]), boxes, scores, labels, cat_ids, decimals=2))
            if self.save_images and (self.max_images is None or self._n_images < self.max_images):
                self._save_image(meta, boxes, scores, labels, names)

    def _save_image(self, meta: dict, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
        path = meta.get("path")
        if not path:
            return
        try:
            image = read_image(path)
        except ImageReadError:
            return  # the dataset already reported it; the JSON rows stand
        from PIL import Image

        assert self._dir is not None
        out_dir = self._dir / "images"
        out_dir.mkdir(exist_ok=True)
        Image.fromarray(draw_boxes(image, boxes, labels, scores, names)).save(out_dir / Path(path).name)
        self._n_images += 1

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._dir is not None
        name = "predictions.json" if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.json"
        write_coco_results(self._dir / name, self._results)
        conf = getattr(getattr(pl_module, "predict_postprocess", None), "conf", None)
        if self._seen and not self._results and conf is not None:  # say why the folder is empty
            log.warning(no_detections_hint(conf, self._best, self._seen, option="--model.predict_postprocess.conf {}"))
