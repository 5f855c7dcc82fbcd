"""Hostile datasets (issue 25): image names that leave the dataset folder, special files posing as
images, 200k boxes on one image, an oversized or deeply nested annotation file, a truncated JPEG met
by a DataLoader worker. Each is refused with one line naming the file and the limit, in bounded time
and memory; the good part of the data still loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import write_coco, write_image
from timeout_helpers import time_limit

from detectkit.data.datamodule import DetectionDataModule, LoaderConfig
from detectkit.data.inspect import inspect_dataset
from detectkit.data.records import DatasetError

CATS = [{"id": 1, "name": "thing"}]


def _image(i: int, name: str) -> dict:
    return {"id": i, "file_name": name, "width": 64, "height": 48}


def _ann(i: int, image_id: int) -> dict:
    return {"id": i, "image_id": image_id, "category_id": 1, "bbox": [4, 4, 20, 20]}


def _problems(report: dict, kind: str) -> list[dict]:
    return [p for p in report["problems"] if p["kind"] == kind]


def test_image_names_must_stay_inside_the_dataset(tmp_path, monkeypatch):
    secret = write_image(tmp_path / "elsewhere" / "secret.jpg")
    folder = tmp_path / "ds" / "train"
    write_image(folder / "a.jpg")
    images = [_image(1, "a.jpg"), _image(2, "../../elsewhere/secret.jpg"), _image(3, str(secret))]
    write_coco(folder, images, [_ann(1, 1), _ann(2, 2), _ann(3, 3)], CATS, "_annotations.coco.json")
    report = inspect_dataset(tmp_path / "ds", decode_images=False)
    outside = _problems(report, "image_outside_dataset")
    assert len(outside) == 2 and all(p["severity"] == "fatal" for p in outside)
    assert "'../../elsewhere/secret.jpg' resolves outside the dataset folder" in outside[0]["message"]
    assert "DETECTKIT_IMAGE_ROOTS" in outside[0]["message"]
    assert report["splits"]["train"]["images"] == 1  # a.jpg still loads
    with pytest.raises(DatasetError, match="resolves outside the dataset folder"):
        DetectionDataModule(data_dir=str(tmp_path / "ds"), image_size=64, loader=LoaderConfig(num_workers=0)).setup("fit")
    # an explicit extra root lets the absolute name (and the ../ one, which lands there too) in
    monkeypatch.setenv("DETECTKIT_IMAGE_ROOTS", str(secret.parent))
    report = inspect_dataset(tmp_path / "ds", decode_images=False)
    assert not _problems(report, "image_outside_dataset") and report["splits"]["train"]["images"] == 3


def test_special_files_are_refused_by_type_without_blocking(tmp_path):
    folder = tmp_path / "ds" / "train"
    write_image(folder / "a.jpg")
    os.mkfifo(folder / "pipe.jpg")  # opening it for reading would block forever
    os.symlink("/dev/zero", folder / "zero.jpg")  # reading it never ends
    (folder / "dir.jpg").mkdir()
    images = [_image(1, "a.jpg"), _image(2, "pipe.jpg"), _image(3, "zero.jpg"), _image(4, "dir.jpg")]
    write_coco(folder, images, [_ann(1, 1)], CATS, "_annotations.coco.json")
    with time_limit(20, "inspect with a FIFO and /dev/zero"):
        report = inspect_dataset(tmp_path / "ds", decode_images=True)
    found = {Path(p["file"]).name: p["message"] for p in _problems(report, "not_a_file")}
    assert found["pipe.jpg"].startswith("a FIFO (named pipe), not an image file")
    assert found["zero.jpg"].startswith("a symlink to '/dev/zero', a character device, not an image file")
    assert found["dir.jpg"].startswith("a directory, not an image file")


def test_too_many_boxes_on_one_image_is_a_clear_error(tmp_path):
    folder = tmp_path / "ds" / "train"
    write_image(folder / "a.jpg")
    write_image(folder / "b.jpg")
    anns = [_ann(i, 1) for i in range(20_001)] + [_ann(20_002, 2)]
    write_coco(folder, [_image(1, "a.jpg"), _image(2, "b.jpg")], anns, CATS, "_annotations.coco.json")
    with time_limit(30, "inspect with 20001 boxes on one image"):
        report = inspect_dataset(tmp_path / "ds", decode_images=False)
    (problem,) = _problems(report, "unreadable_split")
    assert "(image a.jpg): annotations on one image 20001 exceeds the limit 10000" in problem["message"]
    assert "DETECTKIT_LIMITS=max_annotations_per_image=" in problem["message"]


def test_annotation_file_size_is_checked_before_parsing(tmp_path, monkeypatch):
    folder = tmp_path / "ds" / "train"
    write_image(folder / "a.jpg")
    path = write_coco(folder, [_image(1, "a.jpg")], [_ann(1, 1)], CATS, "_annotations.coco.json")
    monkeypatch.setenv("DETECTKIT_LIMITS", "max_annotation_file_bytes=100")
    with pytest.raises(DatasetError) as err:
        DetectionDataModule(data_dir=str(tmp_path / "ds"), image_size=64).setup("fit")
    assert str(err.value) == (f"{path}: COCO annotation file size (bytes) {path.stat().st_size} exceeds the "
                              "limit 100 (raise with DETECTKIT_LIMITS=max_annotation_file_bytes=...)")
    monkeypatch.delenv("DETECTKIT_LIMITS")
    assert inspect_dataset(tmp_path / "ds", decode_images=False)["splits"]["train"]["images"] == 1


def test_deeply_nested_annotation_file_in_bounded_memory(tmp_path):
    """54 MB of nesting used to take 2.9 GB and a RecursionError; now one line, under 1 GB of address
    space beyond the interpreter's, from ``detectkit data inspect``."""
    folder = tmp_path / "ds" / "train"
    write_image(folder / "a.jpg")
    nested = "[" * 200_000 + "]" * 200_000
    text = json.dumps({"images": [_image(1, "a.jpg")], "annotations": [], "categories": CATS})
    (folder / "_annotations.coco.json").write_text(text[:-1] + ', "extra": ' + nested + "}")
    wide = "[" * 50 + "[" + ",".join(["[[[1]]]"] * 100_000) + "]" + "]" * 50
    (tmp_path / "ds2" / "train").mkdir(parents=True)
    write_image(tmp_path / "ds2" / "train" / "a.jpg")
    (tmp_path / "ds2" / "train" / "_annotations.coco.json").write_text(
        json.dumps({"images": [_image(1, "a.jpg"), json.loads(wide)], "annotations": [], "categories": CATS}))
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))\n"
            "from detectkit.cli import main; import sys\n"
            "sys.exit(main(['data', 'inspect', sys.argv[1], '--fast']))\n")
    for ds, expected in (("ds", "JSON nesting depth exceeds the limit 100"),
                         ("ds2", "image entry [[[[...]]]] lacks an 'id'")):
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path / ds)], capture_output=True, text=True,
                             timeout=60)
        assert expected in run.stdout + run.stderr, (run.stdout + run.stderr)[-2000:]
        assert "Traceback" not in run.stderr and "RecursionError" not in run.stdout + run.stderr


def test_truncated_jpeg_in_a_worker_is_our_one_line(tmp_path):
    folder = tmp_path / "ds" / "train"
    for n in range(4):
        write_image(folder / f"{n}.jpg", 320, 240)
    data = (folder / "2.jpg").read_bytes()
    (folder / "2.jpg").write_bytes(data[: len(data) * 3 // 4])  # the header reads; the pixels do not
    images = [{**_image(i + 1, f"{i}.jpg"), "width": 320, "height": 240} for i in range(4)]
    write_coco(folder, images, [_ann(i + 1, i + 1) for i in range(4)], CATS, "_annotations.coco.json")
    dm = DetectionDataModule(data_dir=str(tmp_path / "ds"), image_size=64,
                             loader=LoaderConfig(batch_size=4, num_workers=1))
    dm.max_epochs = 1
    dm.setup("fit")
    with pytest.raises(DatasetError) as err:
        for _ in dm.train_dataloader():
            pass
    message = str(err.value)
    assert "2.jpg" in message and "skip_bad_images=True" in message, message
    assert "Caught" not in message and "Traceback" not in message and "\n" not in message
    # skipping still works: the three good images train
    dm = DetectionDataModule(data_dir=str(tmp_path / "ds"), image_size=64, skip_bad_images=True,
                             loader=LoaderConfig(batch_size=4, num_workers=1))
    dm.max_epochs = 1
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    assert batch["images"].shape[0] == 4  # the bad image's place is taken by a readable one


def test_a_yolo_data_yaml_declaring_a_billion_classes_is_refused(tmp_path):
    write_image(tmp_path / "images" / "train" / "a.jpg")
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "data.yaml").write_text("train: images/train\nnc: 1000000000\n")
    with time_limit(20, "inspect a data.yaml with nc 1e9"):
        report = inspect_dataset(tmp_path, decode_images=False)
    messages = " ".join(p["message"] for p in report["problems"])
    assert "classes (names / nc) 1000000000 exceeds the limit 100000" in messages, report["problems"]
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [thing]\n")
    assert inspect_dataset(tmp_path, decode_images=False)["splits"]["train"]["images"] == 1
