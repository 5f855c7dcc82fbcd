"""Prediction writer: COCO-format result JSON and annotated images in the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from detectkit.predict.draw import draw_boxes

__all__ = ["DetectionWriter"]


class DetectionWriter(BasePredictionWriter):
    """Writes ``predictions.json`` (COCO results: image_id, category_id, bbox xywh, score) and
    ``images/<name>`` with the detections drawn, under ``output_dir`` (default: the run's log
    dir + ``/predictions``).

    Category ids: the datamodule's ``category_ids`` (contiguous label -> dataset id) when it has
    them, else ``label + 1``, the ids of detectkit's own COCO files (synthetic, ``data convert``)
    and of Roboflow COCO exports (id 0 is their unused super-category). COCO 2017's
    non-contiguous ids need ``category_ids``.
    """

    def __init__(self, output_dir: str | None = None, save_images: bool = True, max_images: int | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.save_images = save_images
        self.max_images = max_images
        self._results: list[dict[str, Any]] = []
        self._n_images = 0
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
        self._results, self._n_images = [], 0
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
        cat_ids = getattr(trainer.datamodule, "category_ids", None) if trainer.datamodule is not None else None
        names = list(getattr(pl_module, "class_names", []))
        for item in prediction:
            meta, boxes = item["meta"], item["boxes"].numpy()
            scores, labels = item["scores"].numpy(), item["labels"].numpy()
            for b, s, c in zip(boxes, scores, labels):
                cat = int(cat_ids[int(c)]) if cat_ids is not None else int(c) + 1
                w, h = float(b[2] - b[0]), float(b[3] - b[1])
                self._results.append(
                    {"image_id": int(meta["image_id"]), "category_id": cat,
                     "bbox": [round(float(b[0]), 2), round(float(b[1]), 2), round(w, 2), round(h, 2)],
                     "score": round(float(s), 5)}
                )
            if self.save_images and (self.max_images is None or self._n_images < self.max_images):
                self._save_image(meta, boxes, scores, labels, names)

    def _save_image(self, meta: dict, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
        path = meta.get("path")
        image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path else None
        if image is None:
            return
        drawn = draw_boxes(np.ascontiguousarray(image[:, :, ::-1]), boxes, labels, scores, names)
        assert self._dir is not None
        out_dir = self._dir / "images"
        out_dir.mkdir(exist_ok=True)
        cv2.imwrite(str(out_dir / Path(path).name), drawn[:, :, ::-1])
        self._n_images += 1

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._dir is not None
        name = "predictions.json" if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.json"
        (self._dir / name).write_text(json.dumps(self._results))
