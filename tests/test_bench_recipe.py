"""bench_recipe's pure parts on a tiny generated VOC set: the conversion both sides train/score on, the one
pycocotools scorer, and the per-epoch curves of both tools (no training, no ultralytics needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from data_helpers import write_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_recipe  # noqa: E402

BOXES = {"a": ("cat", (4, 6, 30, 40)), "b": ("dog", (10, 2, 60, 44)), "c": ("cat", (0, 0, 20, 20)),
         "d": ("dog", (30, 10, 62, 46))}


def _voc(root: Path) -> Path:
    for stem, (name, (x1, y1, x2, y2)) in BOXES.items():
        write_image(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>64</width><height>48</height>"
            f"<depth>3</depth></size><object><name>{name}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object></annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("c\nd\n")
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    return bench_recipe.prepare_data(tmp / "out", _voc(tmp / "voc"))


def _rows_from_truth(gt: Path, classes: list[str], shift: float = 0.0) -> list[dict]:
    """Predictions equal to the ground truth (optionally shifted right by ``shift`` x the box width),
    written through the same path both sides use (file name + class name -> ids, xyxy -> COCO rows)."""
    file_to_id, name_to_id = bench_recipe.gt_index(gt)
    category_ids = bench_recipe.category_ids_for(classes, name_to_id)
    data = json.loads(gt.read_text())
    names = {im["id"]: im["file_name"] for im in data["images"]}
    cat_name = {c["id"]: c["name"] for c in data["categories"]}
    pairs = []
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        x += shift * w
        pairs.append((f"/any/folder/{names[ann['image_id']]}", [[x, y, x + w, y + h]], [0.9],
                      [classes.index(cat_name[ann["category_id"]])]))
    return bench_recipe._predict_rows(pairs, file_to_id, category_ids)


def test_the_split_is_converted_once_for_both_sides(converted):
    data_yaml, val_images, gt = converted
    assert sorted(p.name for p in val_images.iterdir()) == ["c.jpg", "d.jpg"]
    assert sorted(p.name for p in (data_yaml.parent / "train" / "images").iterdir()) == ["a.jpg", "b.jpg"]
    truth = json.loads(gt.read_text())
    assert sorted(im["file_name"] for im in truth["images"]) == ["c.jpg", "d.jpg"]
    assert len(truth["annotations"]) == 2
    # the YOLO labels ultralytics trains on hold the VOC boxes (normalised centre/size)
    label = (data_yaml.parent / "val" / "labels" / "c.txt").read_text().split()
    assert [float(v) for v in label[1:]] == pytest.approx([10 / 64, 10 / 48, 20 / 64, 20 / 48], abs=1e-4)


def test_the_scorer_gives_perfect_shifted_and_missing_predictions_their_map(converted):
    _, _, gt = converted
    # a model whose class order differs from the ground truth's ids: matched by name, still perfect
    for classes in (["cat", "dog"], ["dog", "cat"]):
        perfect = bench_recipe.coco_eval(gt, _rows_from_truth(gt, classes))
        assert perfect == pytest.approx({"map_50": 1.0, "map": 1.0})
    # shifted by 30 % of the width: IoU 0.54, found at 0.5 but not at the stricter thresholds
    shifted = bench_recipe.coco_eval(gt, _rows_from_truth(gt, ["cat", "dog"], shift=0.3))
    assert shifted["map_50"] == pytest.approx(1.0)
    assert 0.0 < shifted["map"] < 0.5
    assert bench_recipe.coco_eval(gt, []) == {"map_50": 0.0, "map": 0.0}
    with pytest.raises(SystemExit, match="bird"):
        _rows_from_truth(gt, ["cat", "bird"])


def test_both_tools_curves_are_read_one_based_with_cumulative_time(tmp_path):
    dk = tmp_path / "dk.csv"
    # detectkit's results.csv numbers epochs from 1, as its progress lines do (both tools agree)
    dk.write_text("epoch,step,train/loss,val/map,val/map_50,epoch_time\n1,20,3.1,0.01,0.05,100\n"
                  "2,40,2.9,,,\n2,40,2.8,0.02,0.10,110\n")
    ul = tmp_path / "ul.csv"
    ul.write_text("epoch,time,metrics/mAP50(B),metrics/mAP50-95(B)\n1,90.5,0.2,0.07\n2,185,0.3,0.12\n")
    dk_curve = bench_recipe.detectkit_curve(dk)
    assert dk_curve == [{"epoch": 1, "wall_s": 100.0, "map_50": 0.05, "map": 0.01},
                        {"epoch": 2, "wall_s": 210.0, "map_50": 0.10, "map": 0.02}]
    ul_curve = bench_recipe.ultralytics_curve(ul)
    assert [r["epoch"] for r in ul_curve] == [1, 2] and ul_curve[1]["map"] == pytest.approx(0.12)
    same = bench_recipe.same_wall_time({"detectkit": dk_curve, "ultralytics": ul_curve},
                                       {"detectkit": 210.0, "ultralytics": 185.0})
    assert same["seconds"] == 185.0
    assert same["detectkit"]["epoch"] == 1 and same["ultralytics"]["epoch"] == 2
    assert bench_recipe.at_wall_time(ul_curve, 50.0) is None
