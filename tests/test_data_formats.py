"""Readers: the sharks exports agree across formats; broken inputs become named problems."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import broken_coco, messy_yolo, write_coco, write_image

from detectkit.data.formats import open_dataset
from detectkit.data.records import DatasetError

SHARKS = {"train": (7, 44, [10, 7, 27]), "val": (2, 10, [0, 2, 8]), "test": (1, 6, [0, 1, 5])}


@pytest.mark.parametrize(
    "folder, fmt, splits",
    [
        ("sharks-tiny-coco", "roboflow-coco", ["train", "valid", "test"]),
        ("sharks-tiny-yolov9", "yolo", ["train", "val", "test"]),
        ("sharks-tiny-createml", "createml", ["train", "valid", "test"]),
    ],
)
def test_sharks_exports_agree(shared_dir, folder, fmt, splits):
    src = open_dataset(shared_dir / "data/roboflow_sharks_tiny" / folder)
    assert src.format == fmt
    assert src.splits == splits
    # Roboflow's category 0 ("sharks", the supercategory) is not a class: 3 classes, not 4
    assert src.class_names == ["fish", "primary", "shark"]
    for canon, (images, boxes, per_class) in SHARKS.items():
        split = src.load(canon)  # aliases: "val" finds "valid"
        assert len(split) == images
        assert split.num_boxes == boxes
        assert list(split.per_class().values()) == per_class
        assert split.problems == []
        for r in split.records:
            assert r.boxes.dtype == np.float32 and r.labels.dtype == np.int64
            assert (r.boxes[:, 2] > r.boxes[:, 0]).all() and (r.boxes[:, 3] > r.boxes[:, 1]).all()
            assert (r.boxes[:, 2] <= r.width).all() and (r.boxes[:, 3] <= r.height).all()


def test_yolo_polygon_only_label_file_and_exporter_paths(shared_dir):
    # data.yaml names /Users/tony/... train/val paths that do not exist here
    src = open_dataset(shared_dir / "data/roboflow_sharks_tiny/sharks-tiny-yolov9/data.yaml")
    test = src.load("test")
    assert test.records[0].num_boxes == 6  # the file holds only polygon lines
    train = src.load("train")
    assert all(r.path.is_file() for r in train.records)


def test_coco_problems_are_named_and_counted(tmp_path):
    path = broken_coco(tmp_path)
    split = open_dataset(path.parent).load()
    assert split.class_names == ["cat", "dog"]
    by_id = {r.image_id: r for r in split.records}
    kinds = sorted(p.kind for p in split.problems)
    assert kinds == ["box_outside", "box_outside", "degenerate_box", "duplicate_id", "unknown_class"]
    assert all(str(path) in p.file for p in split.problems)
    assert any("annotation 2" in p.message for p in split.problems if p.kind == "degenerate_box")
    assert any("category id 42" in p.message for p in split.problems if p.kind == "unknown_class")
    np.testing.assert_allclose(by_id[2].boxes, [[50, 30, 64, 48], [2, 2, 10, 10]])  # clipped box kept
    assert by_id[1].num_boxes == 1
    crowd = by_id[5]
    assert crowd.iscrowd.tolist() == [True]  # kept for evaluation ...
    assert len(crowd.train_targets()[0]) == 0  # ... never trained on
    assert split.fatal_problems() == []


def test_coco_duplicate_image_id_is_fatal(tmp_path):
    write_image(tmp_path / "a.jpg")
    imgs = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}] * 2
    path = write_coco(tmp_path, imgs, [], [{"id": 1, "name": "x"}])
    split = open_dataset(path).load()
    assert [p.kind for p in split.fatal_problems()] == ["duplicate_id"]


def test_coco_category_ids_map_in_id_order(tmp_path):
    write_image(tmp_path / "a.jpg")
    cats = [{"id": 30, "name": "c"}, {"id": 5, "name": "a"}, {"id": 12, "name": "b"}]
    anns = [
        {"id": i, "image_id": 1, "category_id": c, "bbox": [1, 1, 5, 5]} for i, c in enumerate((30, 5, 12))
    ]
    split = open_dataset(
        write_coco(tmp_path, [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}], anns, cats)
    ).load()
    assert split.class_names == ["a", "b", "c"]
    assert split.records[0].labels.tolist() == [2, 0, 1]


def test_coco_invalid_json_names_the_file(tmp_path):
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(DatasetError, match="annotations.json: not valid JSON"):
        open_dataset(tmp_path).load()


def test_yolo_quirks(tmp_path):
    yaml_path = messy_yolo(tmp_path)
    src = open_dataset(tmp_path)
    assert src.format == "yolo" and src.class_names == ["cat", "dog"] and src.splits == ["train", "val"]
    train = src.load("train")
    recs = {r.path.name: r for r in train.records}
    assert set(recs) == {"with space 1.jpg", "neg.png", "bad.jpg"}
    assert recs["neg.png"].num_boxes == 0  # negative image, reported as an empty label file
    spaced = recs["with space 1.jpg"]
    assert spaced.labels.tolist() == [1, 0]
    np.testing.assert_allclose(spaced.boxes[0], [40, 15, 60, 35], atol=1e-4)
    np.testing.assert_allclose(spaced.boxes[1], [10, 10, 30, 30], atol=1e-4)  # polygon -> its bounds
    assert recs["bad.jpg"].num_boxes == 1
    problems = {p.kind: p for p in train.problems}
    assert set(problems) == {"unknown_class", "bad_line", "empty_label"}
    assert problems["empty_label"].file.endswith("neg.txt") and problems["empty_label"].severity == "warning"
    assert (
        problems["unknown_class"].file.endswith("bad.txt") and "line 2" in problems["unknown_class"].message
    )
    assert "line 3" in problems["bad_line"].message
    assert src.load("valid").records[0].num_boxes == 1
    assert yaml_path.exists()


def test_yolo_without_yaml_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DatasetError, match="no data.yaml"):
        open_dataset(tmp_path)


def test_voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    (root / "ImageSets/Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for stem, objs in {"x1": [("dog", 0), ("cat", 1)], "x2": [("person", 0)]}.items():
        write_image(root / "JPEGImages" / f"{stem}.jpg", 64, 48)
        body = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>11</xmin><ymin>6</ymin>"
            f"<xmax>30</xmax><ymax>40</ymax></bndbox></object>"
            for n, d in objs
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>64</width><height>48</height></size>{body}</annotation>"
        )
    (root / "ImageSets/Main/train.txt").write_text("x1\n")
    (root / "ImageSets/Main/val.txt").write_text("x2\n")
    src = open_dataset(tmp_path)
    assert src.format == "voc" and src.splits == ["train", "val"]
    assert src.class_names == ["cat", "dog", "person"]  # from all files, so splits agree
    assert src.problems == []  # all Pascal VOC class names: no class list needed, no typo possible
    train = src.load("train")
    rec = train.records[0]
    assert rec.labels.tolist() == [1, 0] and rec.difficult.tolist() == [False, True]
    np.testing.assert_allclose(rec.boxes[0], [10, 5, 30, 40])  # 1-based inclusive -> continuous
    assert src.load("val").records[0].labels.tolist() == [2]


def test_missing_path_and_unannotated_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    write_image(tmp_path / "only.jpg")
    with pytest.raises(DatasetError, match="without annotations"):
        open_dataset(tmp_path)
