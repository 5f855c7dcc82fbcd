"""Every bad dataset is named, counted or refused, never silent (issue 11, point 4).

Each case goes through ``detectkit data inspect --json`` (in process) and through the fit setup
of :class:`DetectionDataModule`, whose log must carry the problem with its count.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml
from data_helpers import bomb_png, write_coco, write_image
from PIL import Image

from detectkit.data import DatasetError, DetectionDataModule, LoaderConfig, convert_dataset, open_dataset
from detectkit.data.commands import main
from detectkit.data.formats.voc import voc_class_list
from detectkit.data.images import ImageReadError, image_size, read_image

# ---- builders ----------------------------------------------------------------------------


def inspect_json(path: Path, capsys, *extra: str) -> tuple[int, dict]:
    code = main(["inspect", str(path), "--json", *extra])
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # exactly one JSON object, whatever went wrong
    return code, json.loads(out)


def problems(report: dict, kind: str) -> list[dict]:
    return [p for p in report["problems"] if p["kind"] == kind]


def setup_fit(root: Path, **kw) -> DetectionDataModule:
    dm = DetectionDataModule(data_dir=str(root), image_size=64,
                             loader=LoaderConfig(batch_size=2, num_workers=0), **kw)
    dm.setup("fit")
    return dm


def yolo_set(root: Path, yaml_extra: str = "", splits=("train", "valid")) -> Path:
    """train/ (a.jpg, b.jpg) and valid/ (v.jpg), one box each; ``names: [cat, dog]``."""
    for split in splits:
        names = ("a", "b") if split == "train" else ("v",)
        for n in names:
            write_image(root / split / "images" / f"{n}.jpg")
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            (root / split / "labels" / f"{n}.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    (root / "data.yaml").write_text(
        "train: train/images\nval: valid/images\nnames: [cat, dog]\n" + yaml_extra
    )
    return root


def voc_xml(root: Path, stem: str, objects: list[tuple[str, tuple[int, int, int, int]]]) -> Path:
    write_image(root / "JPEGImages" / f"{stem}.jpg")
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    path = root / "Annotations" / f"{stem}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><filename>{stem}.jpg</filename><size><width>64</width><height>48</height>"
        f"<depth>3</depth></size>{objs}</annotation>"
    )
    return path


def voc_set(root: Path, objects: dict[str, list], lists: dict[str, list[str]]) -> Path:
    for stem, objs in objects.items():
        voc_xml(root, stem, objs)
    main_dir = root / "ImageSets" / "Main"
    main_dir.mkdir(parents=True, exist_ok=True)
    for name, stems in lists.items():
        (main_dir / f"{name}.txt").write_text("\n".join(stems) + "\n")
    return root


def coco_set(root: Path, train_images, train_anns, cats=None) -> Path:
    """train/ as given, and a clean one-image val/."""
    cats = cats or [{"id": 1, "name": "cat"}]
    for im in train_images:
        if not (root / "train" / im["file_name"]).exists():
            write_image(root / "train" / im["file_name"])
    write_coco(root / "train", train_images, train_anns, cats)
    write_image(root / "val" / "v.jpg")
    write_coco(
        root / "val",
        [{"id": 1, "file_name": "v.jpg", "width": 64, "height": 48}],
        [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20]}],
        cats,
    )
    return root


IMG = {"width": 64, "height": 48}


# ---- 1. decompression bombs ----------------------------------------------------------------


def test_decompression_bomb_is_a_named_error_or_a_counted_skip(tmp_path, capsys, caplog):
    root = yolo_set(tmp_path)
    bomb = bomb_png(root / "train/images/bomb.png")  # ~100 bytes claiming 30000 x 30000
    for reader in (image_size, read_image):
        with pytest.raises(ImageReadError, match="decompression bomb") as e:
            reader(bomb)
        assert e.value.kind == "image_too_large" and str(bomb) in str(e.value)

    code, report = inspect_json(root, capsys)
    (p,) = problems(report, "image_too_large")
    assert code == 0 and p["file"] == str(bomb) and p["severity"] == "error"
    assert "178,956,970 pixels" in p["message"] and report["splits"]["train"]["images"] == 2

    with pytest.raises(DatasetError, match="bomb.png: refused as a possible decompression bomb"):
        setup_fit(root)
    with caplog.at_level(logging.WARNING, "detectkit.data"):
        dm = setup_fit(root, skip_bad_images=True)
    assert dm.datasets["train"].skipped_at_setup == 1 and len(dm.datasets["train"]) == 2
    assert "skipping 1 unusable image(s)" in caplog.text and "bomb.png" in caplog.text


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_images_over_pils_warning_limit_are_read_and_reported(tmp_path, capsys, monkeypatch):
    root = yolo_set(tmp_path)  # 64 x 48 = 3072 pixels each
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # warns over 2000, refuses over 4000
    code, report = inspect_json(root, capsys, "--fast")
    large = problems(report, "large_image")
    assert code == 0 and len(large) == 3 and all(p["severity"] == "warning" for p in large)
    assert report["splits"]["train"]["images"] == 2  # read, not dropped


# ---- 2. VOC class lists -------------------------------------------------------------------


def _voc_typo(root: Path) -> Path:
    return voc_set(
        root,
        {
            "a": [("dog", (5, 5, 30, 30)), ("cat", (10, 10, 40, 40))],
            "b": [("dog", (5, 5, 30, 30)), ("dgo", (10, 10, 40, 40))],
            "c": [("dog", (2, 2, 20, 20))],
        },
        {"train": ["a", "b"], "val": ["c"]},
    )


def test_voc_typo_is_not_a_new_class_when_the_set_has_a_class_list(tmp_path, capsys, caplog):
    root = _voc_typo(tmp_path)
    (root / "classes.txt").write_text("\ufeffcat\ndog\n")
    code, report = inspect_json(root, capsys)
    assert code == 0 and report["classes"] == ["cat", "dog"]
    (p,) = problems(report, "unknown_class")
    assert p["file"] == str(root / "Annotations/b.xml") and "'dgo'" in p["message"]
    assert report["splits"]["train"]["per_class"] == {"cat": 1, "dog": 2}

    with caplog.at_level(logging.WARNING, "detectkit.data"):
        dm = setup_fit(root)
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    assert "unknown_class: 1" in caplog.text and "b.xml" in caplog.text and "'dgo'" in caplog.text


def test_voc_class_list_from_cvat_labelmap_or_argument(tmp_path, capsys):
    root = _voc_typo(tmp_path / "VOCdevkit" / "VOC2012")
    (tmp_path / "labelmap.txt").write_text(
        "# label:color_rgb:parts:actions\nbackground:0,0,0::\ndog:1,2,3::\ncat:4,5,6::\n"
    )
    assert voc_class_list(root) == (["dog", "cat"], tmp_path / "labelmap.txt")
    code, report = inspect_json(tmp_path, capsys)
    assert report["classes"] == ["dog", "cat"] and len(problems(report, "unknown_class")) == 1
    # an argument wins over the file: here it accepts the typo's spelling as a class
    code, report = inspect_json(tmp_path, capsys, "--classes", "dog,cat,dgo")
    assert report["classes"] == ["dog", "cat", "dgo"] and not problems(report, "unknown_class")
    dm = setup_fit(tmp_path, classes=["dog", "cat", "dgo"])
    assert dm.num_classes == 3
    (tmp_path / "labelmap.txt").write_text("# nothing\n")
    with pytest.raises(DatasetError, match="labelmap.txt: the class list is empty"):
        voc_class_list(root)


def test_voc_without_a_class_list_reports_the_order_source_and_likely_typos(tmp_path, capsys, caplog):
    root = _voc_typo(tmp_path)
    code, report = inspect_json(root, capsys)
    assert code == 0 and report["classes"] == ["cat", "dgo", "dog"]
    # the order is said, not warned about: sorted names found in the XML files
    assert report["class_order"]["source"] == "sorted" and "classes.txt" in report["class_order"]["detail"]
    assert not problems(report, "classes_inferred")
    (typo,) = problems(report, "possible_typo")
    assert typo["file"] == str(root / "Annotations/b.xml") and "'dgo'" in typo["message"]
    assert "typo of 'dog'" in typo["message"] and "swapped" in typo["message"]
    text_code = main(["inspect", str(root)])
    out = capsys.readouterr().out
    assert text_code == 0 and "possible_typo" in out and "class order: sorted" in out

    with caplog.at_level(logging.WARNING, "detectkit.data"):
        setup_fit(root)
    assert "classes_inferred" not in caplog.text and "possible_typo: 1" in caplog.text


def test_voc_short_distinct_names_are_not_typos(tmp_path, capsys, caplog):
    """The blood-cell set: RBC, WBC, Platelets; WBC is rare next to RBC, one letter apart, and real."""
    objects = {f"r{i}": [("RBC", (5, 5, 20, 20))] * 6 for i in range(4)}
    objects["w"] = [("WBC", (5, 5, 30, 30)), ("Platelets", (2, 2, 9, 9))]
    root = voc_set(tmp_path, objects, {"train": list(objects)})
    code, report = inspect_json(root, capsys)
    assert code == 0 and report["classes"] == ["Platelets", "RBC", "WBC"]
    assert report["problems"] == []
    with caplog.at_level(logging.WARNING, "detectkit.data"):
        setup_fit(root)
    assert "possible_typo" not in caplog.text and "classes_inferred" not in caplog.text


def test_class_order_source_for_each_kind_of_class_list(tmp_path, capsys):
    root = _voc_typo(tmp_path / "voc")
    (root / "classes.txt").write_text("dog\ncat\n")
    _, report = inspect_json(root, capsys)
    assert report["class_order"] == {"source": "file", "detail": str(root / "classes.txt")}
    _, report = inspect_json(root, capsys, "--classes", "cat,dog,dgo")
    assert report["class_order"]["source"] == "given"
    yolo = yolo_set(tmp_path / "yolo")
    _, report = inspect_json(yolo, capsys)
    assert report["class_order"]["source"] == "file" and str(yolo / "data.yaml") in report["class_order"]["detail"]


# ---- 3, 4, 8, 10. COCO ------------------------------------------------------------------------


def test_coco_two_images_with_one_file_name_are_fatal(tmp_path, capsys):
    root = coco_set(
        tmp_path,
        [{"id": 1, "file_name": "a.jpg", **IMG}, {"id": 2, "file_name": "a.jpg", **IMG}],
        [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [20, 20, 10, 10]},
        ],
    )
    code, report = inspect_json(root, capsys)
    (p,) = problems(report, "duplicate_file")
    assert code == 1 and p["severity"] == "fatal" and p["file"] == str(root / "train/annotations.json")
    assert "ids 1 and 2 both name the file 'a.jpg'" in p["message"]
    with pytest.raises(DatasetError, match="duplicate_file.*'a.jpg'"):
        setup_fit(root)


def test_coco_empty_annotation_list_is_reported(tmp_path, capsys, caplog):
    root = coco_set(tmp_path, [{"id": 1, "file_name": "a.jpg", **IMG}], [])
    code, report = inspect_json(root, capsys)
    (p,) = problems(report, "no_annotations")
    assert code == 0 and p["split"] == "train" and "all 1 image(s) are negatives" in p["message"]
    with caplog.at_level(logging.WARNING, "detectkit.data"):
        setup_fit(root)
    assert "no_annotations: 1" in caplog.text


def test_coco_string_coordinates_name_the_annotation(tmp_path, capsys, caplog):
    root = coco_set(
        tmp_path,
        [{"id": 1, "file_name": "a.jpg", **IMG}],
        [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": ["1", "2", "x", "4"]},
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": ["3", "4", "10", "12.5"]},
            {"id": 13, "image_id": 1, "category_id": 1, "bbox": [None, 1, 2, 3]},
        ],
    )
    code, report = inspect_json(root, capsys)
    bad = problems(report, "bad_entry")
    assert code == 0 and len(bad) == 2
    assert "annotations.json (image a.jpg)" in bad[0]["file"] and "annotation 11" in bad[0]["message"]
    assert "annotation 13" in bad[1]["message"]
    (coerced,) = problems(report, "string_number")
    assert "annotation 12" in coerced["message"]
    assert report["splits"]["train"]["boxes"] == 1  # the numeric strings are read as numbers
    with caplog.at_level(logging.WARNING, "detectkit.data"):
        dm = setup_fit(root)
    assert "bad_entry: 2" in caplog.text and "string_number: 1" in caplog.text
    assert dm.datasets["train"].records[0].boxes.tolist() == [[3.0, 4.0, 13.0, 16.5]]


def test_coco_string_image_ids_are_mapped_and_kept(tmp_path, capsys):
    root = coco_set(
        tmp_path,
        [{"id": "img-b", "file_name": "b.jpg", **IMG}, {"id": "img-a", "file_name": "a.jpg", **IMG}],
        [
            {"id": 1, "image_id": "img-a", "category_id": 1, "bbox": [1, 1, 10, 10]},
            {"id": 2, "image_id": "img-a", "category_id": 1, "bbox": [20, 20, 10, 10]},
            {"id": 3, "image_id": "img-b", "category_id": 1, "bbox": [5, 5, 10, 10]},
            {"id": 4, "image_id": "img-z", "category_id": 1, "bbox": [5, 5, 10, 10]},
        ],
    )
    code, report = inspect_json(root, capsys)
    assert code == 0 and report["splits"]["train"] == {"images": 2, "boxes": 3, "per_class": {"cat": 3},
                                                    "background_images": 0, "empty_label_files": 0,
                                                    "unlabeled_images": 0}
    (p,) = problems(report, "unknown_image")
    assert "'img-z'" in p["message"]
    recs = setup_fit(root).datasets["train"].records
    assert [(r.image_id, r.source_id, r.path.name, r.num_boxes) for r in recs] == [
        (1, "img-b", "b.jpg", 1),
        (2, "img-a", "a.jpg", 2),
    ]
    assert open_dataset(root).load("val").records[0].source_id is None  # int ids stay as written


# ---- 5, 6, 9, 12. YOLO ------------------------------------------------------------------------


def test_yolo_nc_disagreeing_with_names_is_reported(tmp_path, capsys, caplog):
    root = yolo_set(tmp_path, "nc: 3\n")
    code, report = inspect_json(root, capsys)
    (p,) = problems(report, "nc_mismatch")
    assert code == 0 and p["split"] is None and p["file"] == str(root / "data.yaml")
    assert "nc: 3 but 2 names" in p["message"] and report["classes"] == ["cat", "dog"]
    with caplog.at_level(logging.WARNING, "detectkit.data"):
        setup_fit(root)
    assert caplog.text.count("nc_mismatch: 1") == 1  # once per dataset, not per split


def test_yolo_images_without_labels_and_labels_without_images(tmp_path, capsys, caplog):
    root = yolo_set(tmp_path)
    write_image(root / "train/images/negative.jpg")
    (root / "train/labels/ghost.txt").write_text("1 0.5 0.5 0.1 0.1\n")
    code, report = inspect_json(root, capsys)
    (missing,) = problems(report, "missing_label")
    (orphan,) = problems(report, "orphan_label")
    assert missing["file"] == str(root / "train/images/negative.jpg")
    assert "trained as a background (negative) image" in missing["message"]
    assert orphan["file"] == str(root / "train/labels/ghost.txt") and "no image" in orphan["message"]
    assert report["splits"]["train"]["images"] == 3
    with caplog.at_level(logging.WARNING, "detectkit.data"):
        dm = setup_fit(root)
    assert "missing_label: 1" in caplog.text and "orphan_label: 1" in caplog.text
    assert len(dm.datasets["train"]) == 3


def test_yolo_empty_label_files_and_unlabeled_images_are_reported(tmp_path, capsys):
    root = yolo_set(tmp_path)
    for n in ("e1", "e2"):
        write_image(root / f"train/images/{n}.jpg")
        (root / f"train/labels/{n}.txt").write_text("" if n == "e1" else "\n  \n")
    write_image(root / "train/images/nolabel.jpg")
    code, report = inspect_json(root, capsys)
    empty = problems(report, "empty_label")
    assert code == 0 and sorted(p["file"] for p in empty) == [str(root / "train/labels/e1.txt"),
                                                              str(root / "train/labels/e2.txt")]
    train = report["splits"]["train"]
    assert train["images"] == 5 and train["background_images"] == 3
    assert train["empty_label_files"] == 2 and train["unlabeled_images"] == 1
    assert report["splits"]["val"]["background_images"] == 0
    assert main(["inspect", str(root)]) == 0
    assert "train: 2 empty label file(s), 1 image(s) without a label file" in capsys.readouterr().out


def test_yolo_label_file_with_a_bom_keeps_its_first_box(tmp_path, capsys):
    root = yolo_set(tmp_path)
    (root / "train/labels/a.txt").write_bytes("\ufeff1 0.5 0.5 0.2 0.2\n0 0.3 0.3 0.1 0.1\n".encode())
    (root / "data.yaml").write_bytes(("\ufeff" + (root / "data.yaml").read_text()).encode())
    code, report = inspect_json(root, capsys)
    assert code == 0 and report["problems"] == []
    assert report["splits"]["train"]["per_class"] == {"cat": 2, "dog": 1}
    rec = setup_fit(root).datasets["train"].records[0]
    assert rec.path.name == "a.jpg" and rec.labels.tolist() == [1, 0]


def test_old_roboflow_export_test_folder_without_a_key(tmp_path, capsys, caplog):
    root = yolo_set(tmp_path, splits=("train", "valid", "test"))
    code, report = inspect_json(root, capsys)
    assert code == 0 and list(report["splits"]) == ["train", "val", "test"]
    (p,) = problems(report, "split_without_key")
    assert "no 'test:' key" in p["message"] and "add 'test: test/images'" in p["message"]
    summary = convert_dataset(root, tmp_path / "out", progress=False)
    assert summary["splits"]["test"]["images"] == 1
    assert [p["kind"] for p in summary["problems"]] == ["split_without_key"]
    with caplog.at_level(logging.WARNING, "detectkit.data"):
        setup_fit(root)
    assert "split_without_key: 1" in caplog.text


# ---- 7. symlink loops ---------------------------------------------------------------------


def test_symlink_loops_do_not_make_images_vanish(tmp_path, capsys, caplog):
    root = yolo_set(tmp_path)
    images = root / "train/images"
    (images / "sub").mkdir()
    write_image(images / "sub/c.jpg")
    (root / "train/labels/sub").mkdir()
    (root / "train/labels/sub/c.txt").write_text("1 0.5 0.5 0.3 0.3\n")
    os.symlink("..", images / "sub/up")  # a folder loop
    elsewhere = tmp_path / "elsewhere"
    write_image(elsewhere / "d.jpg")
    os.symlink(elsewhere, images / "linked")  # a symlinked folder is followed
    (root / "train/labels/linked").mkdir()
    (root / "train/labels/linked/d.txt").write_text("0 0.5 0.5 0.3 0.3\n")
    os.symlink("loop2.jpg", images / "loop1.jpg")  # an image that is a symlink loop
    os.symlink("loop1.jpg", images / "loop2.jpg")
    (root / "train/labels/loop1.txt").write_text("0 0.5 0.5 0.3 0.3\n")

    code, report = inspect_json(root, capsys)
    (loop,) = problems(report, "symlink_loop")
    assert loop["file"] == str(images / "sub/up") and "already read" in loop["message"]
    broken = problems(report, "broken_symlink")
    assert [Path(p["file"]).name for p in broken] == ["loop1.jpg", "loop2.jpg"]
    assert "a symlink loop" in broken[0]["message"] and broken[0]["severity"] == "error"
    assert report["splits"]["train"]["images"] == 4  # a, b, sub/c, linked/d; each once
    assert not problems(report, "orphan_label")  # loop1.txt belongs to a (broken) image

    with pytest.raises(DatasetError, match="loop1.jpg: a symlink loop"):
        setup_fit(root)
    with caplog.at_level(logging.WARNING, "detectkit.data"):
        dm = setup_fit(root, skip_bad_images=True)
    assert dm.datasets["train"].skipped_at_setup == 2 and len(dm.datasets["train"]) == 4
    assert "symlink_loop: 1" in caplog.text and "skipping 2 unusable image(s)" in caplog.text


# ---- 11, 13. VOC boxes and lists ------------------------------------------------------------


def test_voc_point_boxes_are_dropped_and_counted(tmp_path, capsys, caplog):
    root = voc_set(
        tmp_path,
        {
            "a": [("cat", (10, 10, 10, 10)), ("cat", (5, 5, 30, 30)), ("cat", (7, 3, 7, 20))],
            "c": [("cat", (2, 2, 20, 20))],
        },
        {"train": ["a"], "val": ["c"]},
    )
    (root / "classes.txt").write_text("cat\n")
    code, report = inspect_json(root, capsys)
    points = problems(report, "degenerate_box")
    assert code == 0 and len(points) == 2 and report["splits"]["train"]["boxes"] == 1
    assert points[0]["file"] == str(root / "Annotations/a.xml")
    assert "object 0 (cat): bndbox (10, 10, 10, 10)" in points[0]["message"]
    assert "a point or a line, not an object" in points[0]["message"]
    with caplog.at_level(logging.WARNING, "detectkit.data"):
        dm = setup_fit(root)
    assert "degenerate_box: 2" in caplog.text
    assert dm.datasets["train"].records[0].boxes.tolist() == [[4.0, 4.0, 30.0, 30.0]]


def test_voc_trainval_is_train_plus_val_not_a_split(tmp_path, capsys):
    objects = {s: [("cat", (5, 5, 30, 30))] for s in "abcd"}
    root = voc_set(tmp_path / "voc", objects, {"train": ["a", "b"], "val": ["c"], "trainval": ["a", "b", "c"]})
    (root / "classes.txt").write_text("cat\n")
    code, report = inspect_json(root, capsys)
    assert code == 0 and list(report["splits"]) == ["train", "val"] and report["problems"] == []
    summary = convert_dataset(root, tmp_path / "out", progress=False)
    assert list(summary["splits"]) == ["train", "val"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train", "val"]

    (root / "ImageSets/Main/trainval.txt").write_text("a\nb\nc\nd\n")  # d is in neither list
    code, report = inspect_json(root, capsys)
    (p,) = problems(report, "trainval_differs")
    assert "1 image(s) only in trainval" in p["message"] and list(report["splits"]) == ["train", "val"]

    only = voc_set(tmp_path / "only", objects, {"trainval": ["a", "b"], "test": ["c"]})
    (only / "classes.txt").write_text("cat\n")
    assert open_dataset(only).splits == ["test", "trainval"]
    dm = setup_fit(only)  # trainval is the training split when train/val lists are absent
    assert len(dm.datasets["train"]) == 2


# ---- 14. convert --to yolo ------------------------------------------------------------------


def test_converted_yolo_yaml_resolves_from_any_directory(tmp_path, capsys, monkeypatch):
    root = yolo_set(tmp_path / "src")
    assert main(["convert", str(root), str(tmp_path / "out"), "--to", "yolo"]) == 0
    capsys.readouterr()
    data = yaml.safe_load((tmp_path / "out/data.yaml").read_text())
    # ultralytics joins split paths onto ``path`` and resolves a relative ``path`` against its
    # datasets dir or the cwd: only an absolute one works from anywhere
    assert data["path"] == str((tmp_path / "out").resolve())
    for key in ("train", "val"):
        assert (Path(data["path"]) / data[key]).is_dir()
    monkeypatch.chdir(tmp_path / "src")
    assert len(open_dataset(tmp_path / "out/data.yaml").load("train")) == 2


# ---- 15. errors are one-line user errors ----------------------------------------------------


def test_dataset_errors_are_value_errors_with_the_file(tmp_path, capsys):
    assert issubclass(DatasetError, ValueError)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": "nope", "categories": []}')
    assert main(["inspect", str(bad)]) == 1
    assert main(["convert", str(bad), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}: missing the 'images' list of a COCO file"]
    with pytest.raises(DatasetError, match="bad.json: missing the 'images' list"):
        DetectionDataModule(train=str(bad), val=str(bad), image_size=64, loader=LoaderConfig(num_workers=0)).setup("fit")


def test_likely_typos_only_where_a_typo_is_likely():
    from detectkit.data.classnames import likely_typos

    # same name up to case / spaces / punctuation / plural: flagged whatever the counts
    found = likely_typos({"person": 50, "Person": 40, "traffic light": 9, "traffic_lights": 9, "Platelets": 3,
                          "platelet": 300})
    assert {(n, m) for n, m, _ in found} == {("Person", "person"), ("traffic_lights", "traffic light"),
                                            ("Platelets", "platelet")}
    # one edit on long names with one side rare
    assert [(n, m) for n, m, _ in likely_typos({"helmet": 120, "helmat": 2})] == [("helmat", "helmet")]
    assert likely_typos({"helmet": 120, "helmat": 60}) == []  # both common: two real classes
    # short names one letter apart are real classes: never flagged, however rare one is
    assert likely_typos({"RBC": 4000, "WBC": 370, "cat": 500, "car": 1}) == []
    assert [n for n, _, _ in likely_typos({"dog": 300, "dgo": 1})] == ["dgo"]  # a swap
