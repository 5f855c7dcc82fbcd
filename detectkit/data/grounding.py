"""Grounding data for open-vocabulary training (YOLO-World): ODVG-style JSON lines.

One JSON object per line, either form (``filename`` or ``file_name``; paths relative to
``image_root``, default the file's folder)::

    {"filename": "a.jpg", "height": 480, "width": 640,
     "detection": {"instances": [{"bbox": [x1, y1, x2, y2], "label": 3, "category": "dog"}]}}
    {"filename": "b.jpg", "height": 480, "width": 640,
     "grounding": {"caption": "a dog chasing a red ball",
                   "regions": [{"bbox": [x1, y1, x2, y2], "phrase": "a dog", "tokens_positive": [[0, 5]]}]}}

Boxes are ``xyxy`` original pixels. A region's prompt is its ``phrase``; without one, the
caption text its ``tokens_positive`` character spans cover. Every distinct phrase (category name or region phrase) of
a file forms the *phrase pool*.

Vocabulary layout (chosen here, used by the YOLO-World module): **per-image vocabularies**.
Each image gets its own prompt list: the phrases of its boxes (positives) plus
``num_negatives`` phrases sampled from the pool that are not among the image's phrases,
shuffled. A batch pads the lists to a common K; ``texts[b]`` holds only image ``b``'s real
prompts (no placeholder strings) and ``text_mask [B,K]`` (True = real prompt) marks them.
A target's class index is the position of its phrase in ``texts[b]``. The model takes the mask
as ``text_mask`` and the v8 loss as ``class_mask``: padding is never predicted, never
matched and gives no loss. Sampling is a pure function of ``(seed, epoch, index)``, so batches
do not depend on the number of workers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detectkit.data.collate import collate
from detectkit.data.datamodule import DetectionDataModule
from detectkit.data.dataset import DetectionDataset
from detectkit.data.records import (
    DatasetError,
    DetectionSplit,
    ImageRecord,
    Problem,
    clean_boxes,
    log_problems,
)
from detectkit.limits import loads_json

__all__ = [
    "GroundingRecord",
    "read_odvg",
    "write_odvg",
    "phrase_pool",
    "odvg_class_names",
    "grounding_split",
    "image_vocabulary",
    "BatchVocabulary",
    "sample_vocabularies",
    "GroundingDataset",
    "grounding_collate",
    "GroundingDataModule",
]


@dataclass
class GroundingRecord:
    """One image: its boxes and, per box, the phrase (class name or caption span) it grounds."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [n, 4] xyxy original pixels
    phrases: list[str]  # len n
    caption: str | None = None
    labels: list[int] | None = None  # detection-style files: the dataset's class index per box


def _box(value: Any, where: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"{where}: bbox must be [x1, y1, x2, y2], got {value!r}")
    x1, y1, x2, y2 = (float(v) for v in value)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"{where}: empty or inverted bbox {value!r}")
    return [x1, y1, x2, y2]


def _caption_span(caption: str, spans: Any) -> str | None:
    """The caption text a region's ``tokens_positive`` character spans cover (GoldG layout)."""
    if not isinstance(spans, list) or not spans:
        return None
    try:
        parts = [caption[int(a) : int(b)] for a, b in spans]
    except (TypeError, ValueError):
        return None
    return " ".join(p.strip() for p in parts if p.strip()) or None


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
            item = loads_json(line, where)  # depth-guarded: a hostile line is a LimitError, not a RecursionError
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
        if "filename" not in item and "file_name" in item:
            item["filename"] = item["file_name"]
        for key in ("filename", "height", "width"):
            if key not in item:
                raise ValueError(f"{where}: missing {key!r}")
        boxes, phrases, caption, labels = [], [], None, None
        if "detection" in item:
            labels = []
            for inst in item["detection"].get("instances", []):
                name = inst.get("category")
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(f"{where}: detection instance without a 'category' name")
                boxes.append(_box(inst.get("bbox"), where))
                phrases.append(name.strip())
                labels.append(int(inst["label"]) if "label" in inst else -1)
        elif "grounding" in item:
            caption = item["grounding"].get("caption")
            for region in item["grounding"].get("regions", []):
                phrase = region.get("phrase")
                if (not isinstance(phrase, str) or not phrase.strip()) and caption:
                    phrase = _caption_span(caption, region.get("tokens_positive"))
                if not isinstance(phrase, str) or not phrase.strip():
                    raise ValueError(
                        f"{where}: grounding region without a 'phrase' (or caption tokens_positive)"
                    )
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
                labels=labels,
            )
        )
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def write_odvg(split: DetectionSplit, path: str | Path, image_root: str | Path | None = None) -> Path:
    """Write a detection split (any supported format) as detection-style ODVG lines.

    Image paths are written relative to ``image_root`` (default: the output file's folder) when
    possible, else absolute. Crowd boxes are left out (they are not objects to learn).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for rec in split.records:
        boxes, labels = rec.train_targets()
        try:
            name = str(Path(rec.path).resolve().relative_to(root.resolve()))
        except ValueError:
            name = str(Path(rec.path).resolve())
        instances = [
            {
                "bbox": [round(float(v), 2) for v in box],
                "label": int(lab),
                "category": split.class_names[int(lab)],
            }
            for box, lab in zip(boxes, labels)
        ]
        lines.append(
            json.dumps(
                {
                    "filename": name,
                    "height": rec.height,
                    "width": rec.width,
                    "detection": {"instances": instances},
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def phrase_pool(records: list[GroundingRecord]) -> list[str]:
    """Every distinct phrase of a dataset, sorted: the source of negatives."""
    return sorted({p for r in records for p in r.phrases})


def odvg_class_names(records: list[GroundingRecord]) -> list[str]:
    """Class names of a file: detection-style files with labels give names ordered by label
    (``label -> category`` must be consistent); anything else gives the phrase pool."""
    mapping: dict[int, str] = {}
    for r in records:
        if r.labels is None or any(lab < 0 for lab in r.labels):
            return phrase_pool(records)
        for lab, name in zip(r.labels, r.phrases):
            if mapping.setdefault(lab, name) != name:
                raise ValueError(f"label {lab} is both {mapping[lab]!r} and {name!r}")
    if sorted(mapping) != list(range(len(mapping))):
        return phrase_pool(records)
    return [mapping[i] for i in range(len(mapping))]


def grounding_split(records: list[GroundingRecord], pool: Sequence[str], source: str = "") -> DetectionSplit:
    """Records as a :class:`DetectionSplit` whose classes are the phrase ``pool`` (so the shared
    detection pipeline, mosaic included, carries phrase ids); boxes clipped like every reader."""
    index = {p: i for i, p in enumerate(pool)}
    problems: list[Problem] = []
    out = []
    for i, r in enumerate(records):
        missing = [p for p in r.phrases if p not in index]
        if missing:
            raise DatasetError(f"{r.path}: phrases {missing} are not in the phrase pool")
        labels = np.array([index[p] for p in r.phrases], np.int64)
        boxes, labels, _ = clean_boxes(r.boxes, labels, r.width, r.height, str(r.path), problems)
        out.append(ImageRecord(r.path, i, r.width, r.height, boxes, labels))
    log_problems(problems, source or "grounding")
    return DetectionSplit("odvg", "train", list(pool), out, problems, source)


def image_vocabulary(
    positives: Sequence[int],
    exclude: Sequence[int],
    pool_size: int,
    num_negatives: int,
    rng: np.random.Generator,
) -> list[int]:
    """Prompt ids of one image: its distinct ``positives`` plus ``num_negatives`` pool ids that
    are neither positives nor in ``exclude``, shuffled. At least one prompt is returned when the
    pool allows it (an image without boxes still gets one negative)."""
    pos = list(dict.fromkeys(int(p) for p in positives))
    banned = set(pos) | {int(e) for e in exclude}
    candidates = np.array([i for i in range(pool_size) if i not in banned], np.int64)
    want = num_negatives if (pos or num_negatives > 0) else 1
    neg = (
        rng.choice(candidates, size=min(want, len(candidates)), replace=False).tolist()
        if len(candidates)
        else []
    )
    ids = pos + [int(n) for n in neg]
    order = rng.permutation(len(ids))
    return [ids[i] for i in order]


@dataclass
class BatchVocabulary:
    """Per-image prompts: ``names[b]`` (real prompts only) padded by ``mask [B,K]``."""

    names: list[list[str]]
    mask: torch.Tensor  # bool [B, K]; True for the first len(names[b]) slots of row b
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

    def embeddings(self, encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """``[B, K, dim]`` text embeddings (zeros at padding), one ``encode(unique names)`` call:
        the text encoder (a model's concern) is passed in, so the data layer imports no model."""
        return embed_vocabulary(self.names, self.mask.shape[1], encode)


def embed_vocabulary(names: list[list[str]], k: int, encode: Any) -> torch.Tensor:
    """``[B, K, dim]`` from ragged per-image ``names`` with ``encode(unique_names) -> [U, dim]``."""
    unique = sorted({n for row in names for n in row})
    if not unique:
        raise ValueError("the batch has no prompts at all")
    table = encode(unique)
    pos = {n: i for i, n in enumerate(unique)}
    out = torch.zeros(len(names), k, table.shape[1], dtype=table.dtype)
    for b, row in enumerate(names):
        if row:
            out[b, : len(row)] = table[[pos[n] for n in row]]
    return out


def _pad_mask(lengths: Sequence[int]) -> torch.Tensor:
    k = max(max(lengths, default=0), 1)
    return torch.arange(k)[None, :] < torch.tensor(list(lengths), dtype=torch.long)[:, None]


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
        rows.append(positives + rng.sample(candidates, min(extra, len(candidates))))
        labels.append(torch.tensor([index[p] for p in image_phrases], dtype=torch.int64))
    return BatchVocabulary(rows, _pad_mask([len(r) for r in rows]), labels)


class GroundingDataset(DetectionDataset):
    """A :class:`DetectionDataset` over phrase ids that adds each sample's vocabulary.

    Samples gain ``prompts`` (the image's prompt strings) and their ``labels`` become indices
    into ``prompts``. Augmentation (mosaic, mixup, affine, HSV, flip) is the detection one.
    """

    def __init__(self, split: DetectionSplit, *args: Any, num_negatives: int = 8, **kwargs: Any) -> None:
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        super().__init__(split, *args, **kwargs)
        self.pool = list(split.class_names)
        self.num_negatives = int(num_negatives)

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 0x67726E64])
        present = sample["labels"].tolist()
        # the source image's own phrases are never negatives, even where augmentation cut them out
        ids = image_vocabulary(
            present, sample["meta"]["labels"].tolist(), len(self.pool), self.num_negatives, rng
        )
        slot = {p: i for i, p in enumerate(ids)}
        sample["labels"] = torch.tensor([slot[p] for p in present], dtype=torch.int64)
        sample["prompts"] = [self.pool[p] for p in ids]
        sample["meta"]["prompt_ids"] = ids
        return sample


def grounding_collate(samples: list[dict]) -> dict:
    """The detection batch plus ``texts`` (per image, real prompts only) and ``text_mask [B,K]``."""
    batch = collate(samples)
    texts = [list(s["prompts"]) for s in samples]
    batch["texts"] = texts
    batch["text_mask"] = _pad_mask([len(t) for t in texts])
    return batch


class GroundingDataModule(DetectionDataModule):
    """Open-vocabulary training on ODVG JSON lines, validation on a detection dataset.

    Args:
        odvg: the training file (detection- or grounding-style lines, see the module docstring).
        image_root: folder the file's ``filename`` entries are relative to (default: its folder).
        num_negatives: phrases sampled from the pool per image, besides its own.
        val, test, data_dir: evaluation data in any supported detection format; its class
            names are the fixed vocabulary the module evaluates with. Without any, the class
            names are the file's (detection-style labels) or its phrase pool, and there is no
            validation.

    The other arguments are :class:`DetectionDataModule`'s (augmentation, sizes, loaders).
    """

    def __init__(
        self,
        odvg: str,
        image_root: str | None = None,
        num_negatives: int = 8,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("train"):
            raise ValueError(
                "GroundingDataModule trains on `odvg`; give evaluation data as val/test/data_dir"
            )
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        super().__init__(**kwargs)
        self.odvg = odvg
        self.image_root = image_root
        self.num_negatives = num_negatives
        self.has_eval_data = not self.is_synthetic
        self.is_synthetic = False
        self.synthetic = None
        self._records: list[GroundingRecord] | None = None

    @property
    def records(self) -> list[GroundingRecord]:
        if self._records is None:
            self._records = read_odvg(self.odvg, self.image_root)
        return self._records

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None and not self.has_eval_data:
            self._class_names = odvg_class_names(self.records)
        return super().class_names

    def prepare_data(self) -> None:
        self.records  # noqa: B018 - parse early: a bad line fails before any worker starts

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and "train" not in self.datasets:
            split = grounding_split(self.records, phrase_pool(self.records), str(self.odvg))
            self.datasets["train"] = GroundingDataset(
                split,
                self.image_size,
                train=True,
                augment=self.augment,
                seed=self.seed,
                skip_bad_images=self.skip_bad_images,
                num_negatives=self.num_negatives,
            )
        super().setup(stage)

    def _loader(self, ds: DetectionDataset, batch_size: int, sampler: Any, drop_last: bool) -> Any:
        loader = super()._loader(ds, batch_size, sampler, drop_last)
        if isinstance(ds, GroundingDataset):
            loader.collate_fn = grounding_collate
        return loader
