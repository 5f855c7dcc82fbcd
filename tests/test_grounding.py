"""Grounding data end to end: ODVG file -> per-image vocabularies -> masked YOLO-World training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detectkit.data import AugmentConfig, LoaderConfig
from detectkit.data.formats.detect import open_dataset
from detectkit.data.grounding import (
    GroundingDataModule,
    grounding_collate,
    image_vocabulary,
    odvg_class_names,
    read_odvg,
    write_odvg,
)
from detectkit.data.synthetic import SyntheticConfig, synthetic_dataset
from detectkit.models.yolo_world.head import MASKED_LOGIT
from detectkit.models.yolo_world.text import EmbeddingsFileEncoder
from detectkit.modules import OptimConfig

NO_AUG = AugmentConfig(mosaic_prob=0.0, mixup_prob=0.0, translate=0.0, scale=(1.0, 1.0), hsv_prob=0.0, flip_prob=0.0)
PHRASES = {"rectangle": "a red box", "ellipse": "green oval", "triangle": "blue triangle"}
EXTRA = ["a cat", "the sky", "yellow star", "purple cross"]


@pytest.fixture(scope="module")
def grounding_dir(tmp_path_factory) -> Path:
    """Generated images as grounding-style lines (caption + region phrases) plus an embeddings file."""
    out = tmp_path_factory.mktemp("grounding")
    root = synthetic_dataset(
        SyntheticConfig(train_images=6, val_images=2, size=96, max_objects=3, object_size=(0.25, 0.5)),
        out / "syn",
    )
    split = open_dataset(root).load("train")
    lines = []
    for i, rec in enumerate(split.records):
        phrases = [PHRASES[split.class_names[k]] for k in rec.labels]
        regions = [
            {"bbox": b.tolist(), "phrase": p, "tokens_positive": [[0, len(p)]]}
            for b, p in zip(rec.boxes, phrases)
        ]
        item = {"file_name": str(rec.path), "height": rec.height, "width": rec.width}
        item["grounding"] = {"caption": " and ".join(phrases), "regions": regions}
        if i == 1:  # GoldG layout: the phrase is the caption span tokens_positive points at
            regions[0] = {"bbox": regions[0]["bbox"], "tokens_positive": [[0, len(phrases[0])]]}
        if i == 0:  # extra phrases for the pool (tiny boxes)
            item["grounding"]["regions"] += [{"bbox": [0, 0, 5, 5], "phrase": p} for p in EXTRA]
        lines.append(json.dumps(item))
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    gen = torch.Generator().manual_seed(0)
    names = list(PHRASES.values()) + EXTRA + list(PHRASES)
    torch.save({n: torch.randn(512, generator=gen) for n in names}, out / "phrases.pt")
    (out / "root").symlink_to(root)
    return out


def test_reader_and_detection_style_round_trip(grounding_dir: Path, tmp_path: Path) -> None:
    records = read_odvg(grounding_dir / "train.jsonl", image_root="/")
    assert len(records) == 6 and records[0].caption and all(r.path.is_file() for r in records)
    assert set(EXTRA) <= {p for r in records for p in r.phrases}
    split = open_dataset(grounding_dir / "root").load("train")
    path = write_odvg(split, tmp_path / "det.jsonl", image_root=grounding_dir / "root")
    back = read_odvg(path, image_root=grounding_dir / "root")
    assert [r.path.resolve() for r in back] == [r.path.resolve() for r in split.records]
    assert odvg_class_names(back) == split.class_names  # names ordered by label, not alphabetically
    np.testing.assert_allclose(back[1].boxes, split.records[1].boxes, atol=0.01)
    assert back[1].labels == split.records[1].labels.tolist()


def test_negatives_seeded_and_never_positives() -> None:
    for seed in range(20):
        ids = image_vocabulary(
            [3, 1, 3], exclude=[7], pool_size=10, num_negatives=4, rng=np.random.default_rng(seed)
        )
        again = image_vocabulary(
            [3, 1, 3], exclude=[7], pool_size=10, num_negatives=4, rng=np.random.default_rng(seed)
        )
        assert ids == again and len(ids) == 6 == len(set(ids))
        assert {1, 3} <= set(ids) and 7 not in ids
    # an image without boxes still gets one prompt; a pool smaller than asked gives what it has
    assert len(image_vocabulary([], [], 5, 0, np.random.default_rng(0))) == 1
    assert sorted(image_vocabulary([0], [], 3, 10, np.random.default_rng(0))) == [0, 1, 2]


def test_datamodule_batches(grounding_dir: Path) -> None:
    dm = GroundingDataModule(
        odvg=str(grounding_dir / "train.jsonl"), image_root="/", num_negatives=2, image_size=96,
        loader=LoaderConfig(batch_size=3, num_workers=0), seed=5, augment=NO_AUG,
    )
    assert dm.num_classes == len(PHRASES) + len(EXTRA)  # no evaluation data: the phrase pool
    dm.setup("fit")
    ds = dm.datasets["train"]
    records = read_odvg(grounding_dir / "train.jsonl", image_root="/")
    first = [ds[i]["prompts"] for i in range(6)]
    assert first == [ds[i]["prompts"] for i in range(6)]  # a pure function of (seed, epoch, index)
    ds.set_epoch(1)
    assert [ds[i]["prompts"] for i in range(6)] != first  # new negatives each epoch
    for i, rec in enumerate(records):
        sample = ds[i]
        own = set(rec.phrases)
        names = [sample["prompts"][k] for k in sample["labels"].tolist()]
        assert set(names) <= own and (i == 0 or sorted(names) == sorted(rec.phrases))
        negatives = [p for p in sample["prompts"] if p not in names]
        assert len(negatives) == 2 and not own & set(negatives)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"images", "targets", "meta", "texts", "text_mask"}
    mask, texts = batch["text_mask"], batch["texts"]
    assert mask.dtype == torch.bool and mask.shape == (3, max(len(t) for t in texts))
    assert mask.sum(1).tolist() == [len(t) for t in texts] and all("" not in t for t in texts)
    for b, cls in batch["targets"][:, :2].long().tolist():
        assert cls < len(texts[b])  # targets index the image's own prompts, never padding
    with pytest.raises(ValueError, match="trains on `odvg`"):
        GroundingDataModule(odvg="x.jsonl", train="somewhere")


def test_masked_prompts_never_matched_and_training_reduces_loss(grounding_dir: Path) -> None:
    from detectkit.modules.detector import DetectionModule

    torch.manual_seed(0)
    dm = GroundingDataModule(
        odvg=str(grounding_dir / "train.jsonl"), image_root="/", num_negatives=1,
        val=str(grounding_dir / "root/val"), image_size=96, loader=LoaderConfig(batch_size=3, num_workers=0),
        augment=NO_AUG,
    )
    assert dm.class_names == list(PHRASES)  # evaluation vocabulary: the val set's class names
    module = DetectionModule(
        "yolo_world_v2_s", num_classes=dm.num_classes, class_names=dm.class_names,
        text_encoder=str(grounding_dir / "phrases.pt"),
        optim=OptimConfig(lr=2e-3, warmup_steps=0, weight_decay=0.0),
    )
    module.setup("fit")
    enc = EmbeddingsFileEncoder(grounding_dir / "phrases.pt")
    torch.testing.assert_close(module.model.txt_feats, enc.encode(list(PHRASES)))
    dm.setup("fit")
    batch = grounding_collate([dm.datasets["train"][i] for i in (0, 1, 2)])
    batch["images"] = batch["images"].float() / 255
    assert not batch["text_mask"].all()  # image 0 has more prompts: the others are padded

    inputs = module.world.model_inputs(batch, "cpu")
    assert inputs["text"].shape[:2] == batch["text_mask"].shape
    row = batch["texts"][1]
    torch.testing.assert_close(inputs["text"][1, : len(row)], enc.encode(row))
    module.model.train()
    head = module.model(batch["images"], **inputs)
    pad = ~batch["text_mask"]
    assert (head.cls_logits.permute(0, 2, 1)[pad] == MASKED_LOGIT).all()  # sigmoid exactly 0
    k = pad.shape[1]
    criterion = module.world.criterion_for(k, module.criterion)
    assignment = criterion.assign(head, batch["targets"], 3)
    fg_labels = assignment.labels[assignment.fg_mask]
    assert len(fg_labels) and not pad[assignment.fg_mask.nonzero()[:, 0], fg_labels].any()
    # whatever sits in the padded slots gives the same loss
    noisy = {**inputs, "text": torch.where(pad[..., None], torch.randn_like(inputs["text"]), inputs["text"])}
    with torch.no_grad():
        a, _ = module.compute_loss(
            module.model(batch["images"], **inputs), batch["targets"], 3, batch["text_mask"]
        )
        b, _ = module.compute_loss(
            module.model(batch["images"], **noisy), batch["targets"], 3, batch["text_mask"]
        )
    torch.testing.assert_close(a, b)

    optimizer = torch.optim.AdamW(module.model.parameters(), lr=2e-3)
    losses = []
    for _ in range(4):
        head = module.model(batch["images"], **module.world.model_inputs(batch, "cpu"))
        loss, _ = module.compute_loss(head, batch["targets"], 3, batch["text_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert module.world.cache.misses == len(
        {p for t in batch["texts"] for p in t}
    )  # each phrase encoded once
