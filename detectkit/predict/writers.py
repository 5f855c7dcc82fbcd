"""THE COCO results writer: ``[{image_id, category_id, bbox [x, y, w, h], score}]`` rows.

One category-id rule for every writer (``detectkit predict``, the Lightning prediction writer,
``ImagePrediction.to_coco``, the server): ``category_ids[label]`` when the model (or the dataset
it was trained on) maps labels to dataset ids, else ``label + 1``, the ids of detectkit's own COCO
files (synthetic data, ``data convert``) and of Roboflow COCO exports (id 0 is their unused
super-category). COCO 2017's non-contiguous ids need the mapping.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["category_id", "category_ids_of", "coco_rows", "write_coco_results"]


def category_id(label: int, category_ids: Sequence[int] | None) -> int:
    """The dataset category id of a contiguous class ``label``."""
    label = int(label)
    if category_ids is None:
        return label + 1
    if not 0 <= label < len(category_ids):
        raise ValueError(f"label {label} has no category id (the mapping has {len(category_ids)} entries)")
    return int(category_ids[label])


def category_ids_of(model: Any, datamodule: Any = None) -> list[int] | None:
    """The mapping to use: the model's ``category_ids`` (set by ``detectkit.load`` from the
    checkpoint), else the datamodule's (a Lightning run), else None (``label + 1``)."""
    for owner in (model, getattr(model, "model", None), datamodule):
        ids = getattr(owner, "category_ids", None) if owner is not None else None
        if ids is not None:
            return [int(i) for i in ids]
    return None


def _array(values: Any, dtype: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def coco_rows(
    image_id: int | str,
    boxes: Any,
    scores: Any,
    labels: Any,
    category_ids: Sequence[int] | None = None,
    decimals: int | None = None,
) -> list[dict[str, Any]]:
    """Rows for one image from xyxy ``boxes [N,4]`` (original pixels), ``scores [N]``, ``labels [N]``.
    ``decimals`` rounds bbox (and score to ``decimals + 3``) to keep large JSON files small."""
    b = _array(boxes, np.float64).reshape(-1, 4)
    s = _array(scores, np.float64).reshape(-1)
    lab = _array(labels, np.int64).reshape(-1)
    rows = []
    for (x1, y1, x2, y2), score, label in zip(b.tolist(), s.tolist(), lab.tolist()):
        bbox = [x1, y1, x2 - x1, y2 - y1]
        if decimals is not None:
            bbox, score = [round(v, decimals) for v in bbox], round(score, decimals + 3)
        rows.append({"image_id": image_id, "category_id": category_id(label, category_ids), "bbox": bbox,
                     "score": score})
    return rows


def write_coco_results(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write the rows as JSON (through a temporary file, so a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, path)
    return path
