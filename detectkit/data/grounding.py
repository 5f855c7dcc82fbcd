"""Grounding data for open-vocabulary training (YOLO-World): ODVG-style JSON lines.

One JSON object per line, either form (paths relative to ``image_root``)::

    {"filename": "a.jpg", "height": 480, "width": 640,
     "detection": {"instances": [{"bbox": [x1, y1, x2, y2], "label": 3, "category": "dog"}]}}
    {"filename": "b.jpg", "height": 480, "width": 640,
     "grounding": {"caption": "a dog chasing a red ball",
                   "regions": [{"bbox": [x1, y1, x2, y2], "phrase": "a dog"}, ...]}}

Boxes are ``xyxy`` original pixels. :func:`sample_vocabularies` turns a batch into per-image
prompt lists: the image's own phrases (positives) plus negatives sampled from a pool, padded
to a common K with a mask (``True`` = real prompt). The model takes the mask as ``text_mask``
and the loss as ``class_mask``: padding is never predicted and never matched.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["GroundingRecord", "read_odvg", "BatchVocabulary", "sample_vocabularies", "phrase_pool"]


@dataclass
class GroundingRecord:
    """One image: its boxes and, per box, the phrase (class name or caption span) it grounds."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [n, 4] xyxy original pixels
    phrases: list[str]  # len n
    caption: str | None = None


def _box(value, where: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"{where}: bbox must be [x1, y1, x2, y2], got {value!r}")
    x1, y1, x2, y2 = (float(v) for v in value)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"{where}: empty or inverted bbox {value!r}")
    return [x1, y1, x2, y2]


def read_odvg(path: str | Path, image_root: str | Path | None = None) -> list[GroundingRecord]:
    """Parse an ODVG JSON-lines file; any malformed line raises naming the file and line."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        for key in ("filename", "height", "width"):
            if key not in item:
                raise ValueError(f"{where}: missing {key!r}")
        boxes, phrases, caption = [], [], None
        if "detection" in item:
            for inst in item["detection"].get("instances", []):
                name = inst.get("category")
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(f"{where}: detection instance without a 'category' name")
                boxes.append(_box(inst.get("bbox"), where))
                phrases.append(name.strip())
        elif "grounding" in item:
            caption = item["grounding"].get("caption")
            for region in item["grounding"].get("regions", []):
                phrase = region.get("phrase")
                if not isinstance(phrase, str) or not phrase.strip():
                    raise ValueError(f"{where}: grounding region without a 'phrase'")
                boxes.append(_box(region.get("bbox"), where))
                phrases.append(phrase.strip())
        else:
            raise ValueError(f"{where}: neither 'detection' nor 'grounding' annotations")
        records.append(
            GroundingRecord(
                path=root / item["filename"],
                width=int(item["width"]),
                height=int(item["height"]),
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                phrases=phrases,
                caption=caption,
            )
        )
    return records


def phrase_pool(records: list[GroundingRecord]) -> list[str]:
    """Every distinct phrase of a dataset, sorted: the default source of negatives."""
    return sorted({p for r in records for p in r.phrases})


@dataclass
class BatchVocabulary:
    """Per-image prompts padded to K: ``names[b][k]`` ('' where ``mask[b,k]`` is False)."""

    names: list[list[str]]
    mask: torch.Tensor  # bool [B, K]
    labels: list[torch.Tensor]  # per image, int64 [n]: index of each box's phrase in names[b]

    def targets(self, boxes: list[torch.Tensor]) -> torch.Tensor:
        """``[N, 6] = (batch_index, prompt_index, x1, y1, x2, y2)`` for the detection loss."""
        rows = []
        for b, (lab, box) in enumerate(zip(self.labels, boxes)):
            if len(lab) != len(box):
                raise ValueError(f"image {b}: {len(box)} boxes for {len(lab)} labels")
            rows.append(
                torch.cat([torch.full((len(lab), 1), float(b)), lab[:, None].float(), box.float()], 1)
            )
        return torch.cat(rows) if rows else torch.zeros(0, 6)

    def embeddings(self, encoder, cache=None) -> torch.Tensor:
        """``[B, K, dim]`` text embeddings (zeros at padding), one encoder call per distinct phrase set."""
        from detectkit.models.yolo_world.text import encode_cached

        unique = sorted({n for row, m in zip(self.names, self.mask) for n, keep in zip(row, m) if keep})
        table = dict(zip(unique, encode_cached(encoder, unique, cache)))
        dim = next(iter(table.values())).shape[0]
        out = torch.zeros(len(self.names), self.mask.shape[1], dim)
        for b, row in enumerate(self.names):
            for k, name in enumerate(row):
                if self.mask[b, k]:
                    out[b, k] = table[name]
        return out


def sample_vocabularies(
    phrases: list[list[str]],
    pool: list[str],
    num_prompts: int = 80,
    seed: int = 0,
) -> BatchVocabulary:
    """Positives of each image (deduplicated, in order), then negatives from ``pool`` up to ``num_prompts``.

    Negatives never repeat a positive of the same image. Images with more distinct positives
    than ``num_prompts`` keep them all (K grows to fit). Deterministic for a given ``seed``.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    rng = random.Random(seed)
    rows, labels = [], []
    for image_phrases in phrases:
        positives = list(dict.fromkeys(image_phrases))
        index = {p: i for i, p in enumerate(positives)}
        candidates = [p for p in pool if p not in index]
        extra = max(0, num_prompts - len(positives))
        negatives = rng.sample(candidates, min(extra, len(candidates)))
        rows.append(positives + negatives)
        labels.append(torch.tensor([index[p] for p in image_phrases], dtype=torch.int64))
    k = max(max((len(r) for r in rows), default=0), 1)
    mask = torch.zeros(len(rows), k, dtype=torch.bool)
    for b, row in enumerate(rows):
        mask[b, : len(row)] = True
        row.extend([""] * (k - len(row)))
    return BatchVocabulary(rows, mask, labels)
