"""Dataset, augmentation, collate and DataModule against the batch contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import broken_coco, write_image

from detectkit.data import LoaderConfig
from detectkit.data.collate import collate
from detectkit.data.datamodule import DetectionDataModule
from detectkit.data.dataset import DetectionDataset
from detectkit.data.formats import open_dataset
from detectkit.data.letterbox import letterbox_boxes
from detectkit.data.mosaic import mixup, mosaic4
from detectkit.data.records import DatasetError
from detectkit.data.synthetic import SyntheticConfig, generate_synthetic, synthetic_dataset
from detectkit.data.transforms import AugmentConfig

SMALL = SyntheticConfig(train_images=24, val_images=6, size=64, seed=3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synth"), SMALL)


def _train_ds(root, **aug):
    return DetectionDataset(
        open_dataset(root).load("train"), 64, train=True, augment=AugmentConfig(**aug), seed=1
    )


def test_val_batch_contract(synth):
    ds = DetectionDataset(open_dataset(synth).load("val"), 96, center=True)
    batch = collate([ds[i] for i in range(4)])
    images, targets, meta = batch["images"], batch["targets"], batch["meta"]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 96, 96)
    assert targets.dtype == torch.float32 and targets.shape[1] == 6
    assert set(targets[:, 0].tolist()) <= {0.0, 1.0, 2.0, 3.0}
    for i, m in enumerate(meta):
        assert {
            "image_id",
            "index",
            "path",
            "orig_size",
            "scale",
            "pad",
            "boxes",
            "labels",
            "iscrowd",
        } <= set(m)
        assert m["orig_size"] == (64, 64) and m["scale"] == 1.5 and m["pad"] == (0, 0)
        # input = orig * scale + pad, for every box of the image
        mine = targets[targets[:, 0] == i]
        expect = m["boxes"] * m["scale"] + torch.tensor([*m["pad"], *m["pad"]])
        torch.testing.assert_close(mine[:, 2:], expect)
        assert mine[:, 1].long().tolist() == m["labels"].tolist()


def test_val_letterbox_centre_is_configurable(tmp_path):
    write_image(tmp_path / "w.jpg", 64, 32)
    from data_helpers import write_coco

    p = write_coco(
        tmp_path,
        [{"id": 1, "file_name": "w.jpg", "width": 64, "height": 32}],
        [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 64, 32]}],
        [{"id": 1, "name": "x"}],
    )
    split = open_dataset(p).load()
    centred = DetectionDataset(split, 64, center=True)[0]
    corner = DetectionDataset(split, 64, center=False)[0]
    assert centred["meta"]["pad"] == (0, 16) and corner["meta"]["pad"] == (0, 0)
    torch.testing.assert_close(centred["boxes"], torch.tensor([[0.0, 16.0, 64.0, 48.0]]))
    info_boxes = letterbox_boxes(
        split.records[0].boxes, type("I", (), {"scale": 1.0, "pad_left": 0, "pad_top": 0})()
    )
    np.testing.assert_allclose(corner["boxes"].numpy(), info_boxes)


def test_train_samples_fixed_size_and_valid_boxes(synth):
    ds = _train_ds(synth, mosaic_prob=0.5, mixup_prob=0.5, degrees=10, shear=5)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["images"].shape == (len(ds), 3, 64, 64)
    b = batch["targets"][:, 2:]
    assert len(b) > 0 and (b >= 0).all() and (b <= 64).all()
    assert ((b[:, 2] - b[:, 0]) >= 2).all() and ((b[:, 3] - b[:, 1]) >= 2).all()
    used = [m["augment"] for m in batch["meta"]]
    assert any(u["mosaic"] for u in used) and any(u["mixup"] for u in used)


def test_same_seed_same_augmentation(synth):
    a, b = _train_ds(synth, mosaic_prob=0.5), _train_ds(synth, mosaic_prob=0.5)
    for i in (0, 5):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"]) and torch.equal(sa["boxes"], sb["boxes"])
    b.set_epoch(1)
    assert not torch.equal(a[0]["image"], b[0]["image"])  # a new epoch draws new augmentation


def test_magnitude_zero_is_identity_geometry(synth):
    ds = _train_ds(synth, mixup_prob=0.0, flip_prob=0.0, hsv_prob=0.0)
    ds.set_magnitude(0.0)
    s = ds[2]
    rec = ds.records[s["meta"]["index"]]
    np.testing.assert_allclose(s["boxes"].numpy(), rec.train_targets()[0], atol=1e-3)


def test_mosaic4_places_all_tiles_with_their_boxes():
    rng = np.random.default_rng(0)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    parts = []
    for c in colours:
        img = np.full((32, 32, 3), c, np.uint8)
        parts.append((img, np.array([[0, 0, 32, 32]], np.float32), np.array([colours.index(c)])))
    out, boxes, labels = mosaic4(parts, 64, rng, min_visibility=0.0)
    assert out.shape == (64, 64, 3) and sorted(labels.tolist()) == [0, 1, 2, 3]
    for box, label in zip(boxes.astype(int), labels):
        x1, y1, x2, y2 = box
        patch = out[y1:y2, x1:x2].reshape(-1, 3)
        assert (patch == colours[label]).all(1).mean() > 0.95


def test_mixup_blends_and_keeps_both_box_sets():
    a = (np.full((8, 8, 3), 200, np.uint8), np.array([[0, 0, 4, 4]], np.float32), np.array([0]))
    b = (np.full((8, 8, 3), 100, np.uint8), np.array([[2, 2, 8, 8]], np.float32), np.array([1]))
    img, boxes, labels = mixup(a, b)
    assert (img == 150).all() and boxes.shape == (2, 4) and labels.tolist() == [0, 1]


def test_datamodule_two_workers_close_mosaic_and_worker_count_independence(synth):
    kw = dict(train=str(synth), val=str(synth), image_size=64, seed=5,
              augment=AugmentConfig(mosaic_prob=1.0, mixup_prob=0.0, close_mosaic=1))
    dm = DetectionDataModule(loader=LoaderConfig(batch_size=8, num_workers=2), **kw)
    dm.max_epochs = 2  # no Trainer here: the run length close_mosaic counts back from
    assert dm.num_classes == 3  # before setup, from the annotation file
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
        epochs.append(list(loader))
    assert all(m["augment"]["mosaic"] for b in epochs[0] for m in b["meta"])
    assert not any(m["augment"]["mosaic"] for b in epochs[1] for m in b["meta"])  # seen by persistent workers
    dm0 = DetectionDataModule(loader=LoaderConfig(batch_size=8, num_workers=0), **kw)
    dm0.max_epochs = 2
    dm0.setup("fit")
    loader0 = dm0.train_dataloader()
    loader0.sampler.set_epoch(0)
    for b0, b2 in zip(loader0, epochs[0]):
        assert torch.equal(b0["images"], b2["images"]) and torch.equal(b0["targets"], b2["targets"])


def test_datamodule_hooks_state_and_external_sampler(synth):
    dm = DetectionDataModule(data_dir=str(synth), image_size=64, loader=LoaderConfig(batch_size=4, num_workers=0),
                             augment=AugmentConfig(close_mosaic=2))
    dm.max_epochs = 10
    dm.setup("fit")
    seen = []
    dm.batch_transform = lambda batch: (seen.append(batch["images"].dtype), batch)[1]
    batch = next(iter(dm.val_dataloader()))
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["images"].dtype == torch.float32 and float(out["images"].max()) <= 1.0
    dm.set_train_sampler(lambda ds: torch.utils.data.SequentialSampler(range(6)))
    loader = dm.train_dataloader()
    assert len(loader.sampler) == 6 and [m["index"] for m in next(iter(loader))["meta"]] == [0, 1, 2, 3]
    dm.set_epoch(9)
    dm.magnitude = 0.25
    state = dm.state_dict()
    assert state["epoch"] == 9 and state["magnitude"] == 0.25
    fresh = DetectionDataModule(data_dir=str(synth), image_size=64, loader=LoaderConfig(batch_size=4, num_workers=0),
                                augment=AugmentConfig(close_mosaic=2))
    fresh.max_epochs = 10
    fresh.load_state_dict(state)
    fresh.setup("fit")
    assert fresh.train_dataset.epoch == 9 and not fresh.train_dataset.mix_enabled
    assert fresh.train_dataset.magnitude == 0.25
    stats = fresh.train_dataset.box_stats()
    assert len(stats["num_boxes"]) == 24 and all(0 < a.max() <= 1 for a in stats["rel_areas"] if len(a))


def test_synthetic_default_is_cached_and_deterministic(tmp_path):
    cfg = SyntheticConfig(train_images=4, val_images=2, size=64)
    dm = DetectionDataModule(
        image_size=64, loader=LoaderConfig(batch_size=2, num_workers=0), synthetic=cfg,
        cache_dir=str(tmp_path)
    )
    assert dm.class_names == ["rectangle", "ellipse", "triangle"]
    assert not any(tmp_path.iterdir())  # nothing generated just to know the classes
    dm.prepare_data()
    dm.setup("fit")
    root = synthetic_dataset(cfg, tmp_path)
    assert (root / ".complete").is_file() and len(dm.datasets["val"]) == 2
    again = generate_synthetic(tmp_path / "again", cfg)
    assert (again / "train/annotations.json").read_text() == (root / "train/annotations.json").read_text()
    assert (again / "train/train_000003.jpg").read_bytes() == (root / "train/train_000003.jpg").read_bytes()


def test_bad_images_fail_setup_or_are_counted_skips(tmp_path, caplog):
    split = open_dataset(broken_coco(tmp_path)).load()
    with pytest.raises(DatasetError, match=r"2 unusable image\(s\).*missing.jpg.*corrupt.jpg"):
        DetectionDataset(split, 64)
    ds = DetectionDataset(open_dataset(tmp_path / "train").load(), 64, skip_bad_images=True)
    assert len(ds) == 3 and ds.skipped_at_setup == 2
    assert "skipping 2 unusable image(s)" in caplog.text
    strict = DetectionDataset(open_dataset(tmp_path / "train").load(), 64, skip_bad_images=True)
    strict.skip_bad_images = False
    # an image that breaks after setup (truncated): error naming it, or a counted substitution
    data = ds.records[0].path.read_bytes()
    ds.records[0].path.write_bytes(data[: len(data) // 2])
    batch = collate([ds[i] for i in range(len(ds))])
    assert ds.bad_images_skipped == 1 and batch["meta"][0]["path"] != str(ds.records[0].path)
    with pytest.raises(DatasetError, match="a.jpg: cannot decode"):
        strict[0]


def test_collate_rejects_mixed_sizes():
    def s(h):
        return {
            "image": torch.zeros(3, h, 32, dtype=torch.uint8),
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.long),
            "meta": {"path": f"img{h}.jpg"},
        }

    with pytest.raises(ValueError, match="img32.jpg.*img64.jpg"):
        collate([s(32), s(64)])
    empty = collate([s(32), s(32)])
    assert empty["targets"].shape == (0, 6)


def test_flat_arguments_land_in_their_groups_with_one_warning(tmp_path):
    """Python code written before the grouped configs (``batch_size=``, ``mixup_prob=``) keeps
    working: the values go to ``loader`` / ``augment`` and one FutureWarning names where."""
    cfg = SyntheticConfig(train_images=4, val_images=2, size=64)
    with pytest.warns(FutureWarning, match=r"batch_size -> loader\.batch_size.*mixup_prob -> augment\.mixup_prob"):
        dm = DetectionDataModule(image_size=64, synthetic=cfg, cache_dir=str(tmp_path), batch_size=3, num_workers=0,
                                 mixup_prob=0.25, scale=[0.8, 1.2])
    assert (dm.loader.batch_size, dm.loader.num_workers) == (3, 0)
    assert (dm.augment.mixup_prob, dm.augment.scale) == (0.25, (0.8, 1.2))
    assert dm.hparams["loader"]["batch_size"] == 3 and "batch_size" not in dm.hparams
    with pytest.raises(TypeError, match="unexpected keyword argument 'batch_sise'"):
        DetectionDataModule(synthetic=cfg, batch_sise=3)
