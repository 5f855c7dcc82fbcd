"""`detectkit data inspect|convert|synth`: JSON report, exit codes, round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from data_helpers import broken_coco, messy_yolo, write_image
from PIL import Image

from detectkit.data.commands import main
from detectkit.data.formats import open_dataset

REPO = Path(__file__).resolve().parents[1]


def _inspect_json(path, capsys, *extra) -> tuple[int, dict]:
    code = main(["inspect", str(path), "--json", *extra])
    out = capsys.readouterr().out
    return code, json.loads(out)  # stdout is exactly one JSON object


def test_inspect_sharks_json_as_a_subprocess(shared_dir):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO)}
    path = shared_dir / "data/roboflow_sharks_tiny/sharks-tiny-coco"
    proc = subprocess.run(
        [sys.executable, "-m", "detectkit.data.commands", "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {"format", "classes", "class_order", "splits", "problems"}
    assert report["format"] == "roboflow-coco" and report["classes"] == ["fish", "primary", "shark"]
    assert report["splits"]["valid"] == {
        "images": 2,
        "boxes": 10,
        "per_class": {"fish": 0, "primary": 2, "shark": 8},
        "background_images": 0,
        "empty_label_files": 0,
        "unlabeled_images": 0,
    }
    assert report["class_order"]["source"] == "file" and "(categories, by id)" in report["class_order"]["detail"]
    assert report["problems"] == []


def test_inspect_reports_every_problem_with_its_file(tmp_path, capsys):
    broken_coco(tmp_path / "coco")
    code, report = _inspect_json(tmp_path / "coco", capsys)
    assert code == 0  # nothing fatal: the dataset is usable with skip_bad_images
    kinds = Counter(p["kind"] for p in report["problems"])
    assert kinds == {
        "box_outside": 2,
        "degenerate_box": 1,
        "unknown_class": 1,
        "duplicate_id": 1,
        "missing_image": 1,
        "unreadable_image": 1,
    }
    files = {p["kind"]: p["file"] for p in report["problems"]}
    assert files["missing_image"].endswith("missing.jpg") and files["unreadable_image"].endswith(
        "corrupt.jpg"
    )
    # counts are of usable images and kept boxes: a (1), b (2: clipped + dog), d (crowd kept for eval)
    assert report["splits"]["train"] == {"images": 3, "boxes": 4, "per_class": {"cat": 2, "dog": 2},
                                         "background_images": 0, "empty_label_files": 0, "unlabeled_images": 0}

    messy_yolo(tmp_path / "yolo")
    code, report = _inspect_json(tmp_path / "yolo", capsys)
    assert code == 0 and report["format"] == "yolo" and report["classes"] == ["cat", "dog"]
    assert report["splits"]["train"]["images"] == 3 and report["splits"]["train"]["boxes"] == 3
    unknown = [p for p in report["problems"] if p["kind"] == "unknown_class"]
    assert len(unknown) == 1 and unknown[0]["file"].endswith("bad.txt") and "line 2" in unknown[0]["message"]


def test_inspect_fatal_problems_exit_nonzero(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    write_image(tmp_path / "a/x.jpg")
    (tmp_path / "a/annotations.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "x.jpg", "width": 64, "height": 48}] * 2,
                "categories": [{"id": 1, "name": "c"}],
                "annotations": [],
            }
        )
    )
    code, report = _inspect_json(tmp_path / "a", capsys)
    assert code == 1 and any(
        p["kind"] == "duplicate_id" and p["severity"] == "fatal" for p in report["problems"]
    )
    code, report = _inspect_json(tmp_path / "nothing-here", capsys)
    assert code == 1 and report["problems"][0]["kind"] == "unreadable_dataset"


def test_inspect_human_readable(shared_dir, capsys):
    assert main(["inspect", str(shared_dir / "data/roboflow_sharks_tiny/sharks-tiny-yolov9"), "--fast"]) == 0
    out = capsys.readouterr().out
    assert "format:  yolo" in out and "no problems found" in out and "train" in out


def test_convert_yolo_to_coco_round_trip(shared_dir, tmp_path, capsys):
    src = shared_dir / "data/roboflow_sharks_tiny/sharks-tiny-yolov9"
    assert main(["convert", str(src), str(tmp_path / "coco"), "--to", "coco"]) == 0
    a, b = open_dataset(src), open_dataset(tmp_path / "coco")
    assert b.format == "coco" and b.class_names == a.class_names and b.splits == a.splits
    for split in a.splits:
        ra = {r.path.name: r for r in a.load(split).records}
        rb = {r.path.name: r for r in b.load(split).records}
        assert ra.keys() == rb.keys()
        for name, r in ra.items():
            np.testing.assert_allclose(rb[name].boxes, r.boxes, atol=1e-3)
            assert rb[name].labels.tolist() == r.labels.tolist()
            assert (tmp_path / "coco" / split / name).read_bytes() == r.path.read_bytes()
    # and back to YOLO: the same boxes again
    assert main(["convert", str(tmp_path / "coco"), str(tmp_path / "yolo"), "--to", "yolo"]) == 0
    c = open_dataset(tmp_path / "yolo")
    for name, r in {r.path.name: r for r in a.load("train").records}.items():
        rc = next(x for x in c.load("train").records if x.path.name == name)
        np.testing.assert_allclose(rc.boxes, r.boxes, atol=1e-3)


def test_convert_leaves_out_unusable_images(tmp_path, capsys):
    broken_coco(tmp_path / "coco")
    assert main(["convert", str(tmp_path / "coco"), str(tmp_path / "out")]) == 0
    assert "2 unusable image(s) left out" in capsys.readouterr().out
    assert len(open_dataset(tmp_path / "out").load("train")) == 3


def test_synth_command_is_deterministic(tmp_path, capsys):
    args = ["--images", "6", "--val", "2", "--size", "64", "--seed", "4", "--classes", "4"]
    assert main(["synth", str(tmp_path / "a"), *args]) == 0
    assert main(["synth", str(tmp_path / "b"), *args]) == 0
    ja = json.loads((tmp_path / "a/train/annotations.json").read_text())
    jb = json.loads((tmp_path / "b/train/annotations.json").read_text())
    assert ja["annotations"] == jb["annotations"] and len(ja["categories"]) == 4
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "a/val/val_000001.jpg")),
        np.asarray(Image.open(tmp_path / "b/val/val_000001.jpg")),
    )
    src = open_dataset(tmp_path / "a")
    assert src.splits == ["train", "val"] and src.load("train").num_boxes == len(ja["annotations"])
    assert main(["synth", str(tmp_path / "c"), "--images", "2", "--seed", "5", "--size", "64"]) == 0
    jc = json.loads((tmp_path / "c/train/annotations.json").read_text())
    assert jc["annotations"] != ja["annotations"][: len(jc["annotations"])]
