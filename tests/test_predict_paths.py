"""One prediction path: a model trained at a non-640 size predicts at its own size through
``model.predict``, ``predict_step`` and ``detectkit predict`` alike; EXIF; one drawer; one COCO writer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from compress_helpers import TinyDetector, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

import detectkit
from detectkit.cli import main
from detectkit.data import AugmentConfig, LoaderConfig
from detectkit.data.images import read_image
from detectkit.modules import OptimConfig
from detectkit.ops import PostprocessConfig
from detectkit.predict import ImagePrediction, iter_source
from detectkit.predict.draw import draw_boxes
from detectkit.predict.step import no_detections_hint, suggest_conf
from detectkit.predict.writers import category_id, coco_rows
from detectkit.registry import list_models, register_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64  # the training / validation input: not 640
IMAGE = 80  # the generated images are larger, so the letterbox really rescales


def tiny_predict_detector(num_classes: int = 3, checkpoint: str | None = None) -> TinyDetector:
    return TinyDetector(num_classes=num_classes, width=8)


if "tiny_predict_detector" not in list_models():
    register_model(tiny_predict_detector)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch fit at 64 px on 80 px images; its checkpoint records the 64 px letterbox."""
    from detectkit import DetectionModule
    from detectkit.data import DetectionDataModule
    from detectkit.data.synthetic import SyntheticConfig

    root = tmp_path_factory.mktemp("predict_fit")
    torch.manual_seed(0)
    syn = SyntheticConfig(train_images=4, val_images=3, size=IMAGE, num_classes=3)
    dm = DetectionDataModule(image_size=SIZE, loader=LoaderConfig(batch_size=4, num_workers=0), synthetic=syn,
                             cache_dir=str(root / "data"), augment=AugmentConfig(mixup_prob=0.0))
    module = DetectionModule("tiny_predict_detector", num_classes=3, class_names=dm.class_names,
                             optim=OptimConfig(warmup_steps=1, lr=1e-2),
                             predict_postprocess=PostprocessConfig(conf=0.02, max_det=20))
    trainer = tiny_trainer(root, [ModelCheckpoint(dirpath=root / "ckpt", save_last=True)], 1, train_batches=1)
    trainer.fit(module, dm)
    images = sorted((root / "data").rglob("val/**/*.jpg")) or sorted((root / "data").rglob("*.jpg"))[-3:]
    return root / "ckpt" / "last.ckpt", dm, images


def test_predict_uses_the_trained_size_and_equals_predict_step(trained):
    ckpt, dm, _ = trained
    model = detectkit.load(ckpt)
    assert model.inference.image_size == (SIZE, SIZE) and model.inference.longest is None
    from detectkit import DetectionModule

    module = DetectionModule(model, num_classes=3, predict_postprocess=None).eval()
    assert module.predict_postprocess == model.inference.postprocess  # None = the model's own
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    steps = module.predict_step(batch, 0)
    assert sum(len(s["boxes"]) for s in steps) > 0  # something to compare
    for step in steps:
        pred = model.predict(step["meta"]["path"])[0]  # no size, no conf: all from model.inference
        assert pred.letterbox.input_size == (SIZE, SIZE) and pred.image.shape[:2] == (IMAGE, IMAGE)
        np.testing.assert_allclose(pred.boxes, step["boxes"].numpy(), atol=1e-3)
        np.testing.assert_allclose(pred.scores, step["scores"].numpy(), atol=1e-5)
        np.testing.assert_array_equal(pred.labels, step["labels"].numpy())
    # the 640 default would have been a different prediction
    other = model.predict(steps[0]["meta"]["path"], size=640)[0]
    assert other.letterbox.input_size == (640, 640)


def test_exif_rotated_image_is_predicted_upright(trained, tmp_path):
    ckpt, _, images = trained
    upright = read_image(images[0])[:, :60]  # 80 high, 60 wide: orientation matters
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what a camera writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.png"
    stored.save(path, exif=exif)
    assert np.asarray(Image.open(path)).shape[:2] == (60, 80)  # the raw pixels lie on their side
    (frame,) = iter_source(path)
    np.testing.assert_array_equal(frame.image, upright)
    (frame,) = iter_source(Image.open(path))  # a PIL image goes through the same decoder
    np.testing.assert_array_equal(frame.image, upright)
    model = detectkit.load(ckpt)
    from_file, from_array = model.predict([path, upright])
    assert from_file.image.shape == (80, 60, 3) and from_file.name == "phone.png"
    np.testing.assert_allclose(from_file.boxes, from_array.boxes, atol=1e-4)
    assert from_array.name == "image_000001.jpg"


def test_cli_predict_writes_images_and_coco_json(trained, tmp_path, capsys, monkeypatch):
    ckpt, _, images = trained
    src = tmp_path / "imgs"
    src.mkdir()
    for p in images:
        (src / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    assert main(["predict", "--source", str(src), "--checkpoint", str(ckpt), "--save-dir", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.match(rf"{len(images)} images, \d+ detections", line) and str(out) in line
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted(p.name for p in images)
    rows = json.loads((out / "predictions.json").read_text())
    listed = json.loads((out / "images.json").read_text())
    assert [i["file_name"] for i in listed] == sorted(p.name for p in images)
    model = detectkit.load(ckpt)
    expected = [r for i, p in enumerate(model.predict(src)) for r in p.to_coco(i)]
    assert rows and len(rows) == len(expected)
    for got, want in zip(rows, expected):
        assert got["image_id"] == want["image_id"] and got["category_id"] == want["category_id"]
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-3) and got["score"] == pytest.approx(want["score"])
    assert {r["category_id"] for r in rows} <= {1, 2, 3}  # no mapping recorded: label + 1
    # default save dir: runs/predict/<n>, the next free n
    monkeypatch.chdir(tmp_path)
    for n in (1, 2):
        assert main(["predict", "--source", str(images[0]), "--checkpoint", str(ckpt), "--no-images"]) == 0
        assert (tmp_path / "runs" / "predict" / str(n) / "predictions.json").is_file()


def test_coco_writer_category_ids(trained):
    assert category_id(0, None) == 1 and category_id(2, [5, 7, 90]) == 90
    with pytest.raises(ValueError, match="label 3"):
        category_id(3, [5, 7, 90])
    rows = coco_rows(4, np.array([[1.0, 2.0, 11.0, 22.0]]), np.array([0.5]), np.array([1]), [5, 7, 90])
    assert rows == [{"image_id": 4, "category_id": 7, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]
    ckpt, _, images = trained
    model = detectkit.load(ckpt)
    model.category_ids = [11, 22, 33]  # the dataset's ids, as detectkit.load sets them from the record
    pred = model.predict(images[0], conf=0.0)[0]
    assert len(pred) and {r["category_id"] for r in pred.to_coco(0)} <= {11, 22, 33}
    assert pred.to_coco(0, category_ids=[1, 2, 3])[0]["category_id"] == int(pred.labels[0]) + 1


def test_one_drawer_everywhere():
    img = np.full((50, 70, 3), 30, np.uint8)
    boxes, scores, labels = np.array([[5.0, 8.0, 40.0, 30.0]]), np.array([0.8]), np.array([1])
    pred = ImagePrediction(img, boxes, scores, labels, class_names=["a", "b"])
    np.testing.assert_array_equal(pred.draw(), draw_boxes(img, boxes, labels, scores, ["a", "b"]))
    from detectkit.callbacks.prediction_images import draw_sample

    det = torch.tensor([[5.0, 8.0, 40.0, 30.0, 0.8, 1.0]])
    grid = draw_sample(img, torch.tensor([[6.0, 9.0, 41.0, 31.0]]), torch.tensor([0]), det, ["a", "b"])
    assert grid.shape[0] > img.shape[0]  # enlarged for readable captions, drawn by draw_boxes
    # nothing else in the code draws boxes
    drawers = re.compile(r"cv2\.rectangle|ImageDraw|draw_bounding_boxes")
    offenders = [str(p.relative_to(ROOT)) for d in ("detectkit", "callbacks") for p in (ROOT / d).rglob("*.py")
                 if drawers.search(p.read_text()) and p.name != "draw.py"]
    assert offenders == []


def test_onnx_export_with_default_arguments_gives_the_same_detections(trained, tmp_path, capsys):
    """`detectkit export --checkpoint X --nms batch` (no size, no conf) exports at the trained 64 px with
    the checkpoint's post-processing; onnxruntime then finds what model.predict finds."""
    from detectkit.data.letterbox import letterbox, unletterbox_boxes
    from detectkit.export.deploy import run_onnx
    from detectkit.export.nms import split_batch

    ckpt, _, images = trained
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--nms", "batch", "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["input_shape"] == [1, 3, SIZE, SIZE] and summary["raw_compared"]
    model = detectkit.load(ckpt)
    inf = model.inference
    total = 0
    for path in images:
        pred = model.predict(path)[0]
        padded, info = letterbox(read_image(path), inf.image_size, longest=inf.longest, center=inf.center,
                                 pad_value=inf.pad_value)
        x = padded.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
        (det,) = split_batch(*run_onnx(out, x))
        assert len(det) == len(pred)
        total += len(det)
        order = np.argsort(-det[:, 4], kind="stable")
        np.testing.assert_allclose(unletterbox_boxes(torch.from_numpy(det[order, :4]), info).numpy(), pred.boxes,
                                   atol=1e-2)
        np.testing.assert_allclose(det[order, 4], pred.scores, atol=1e-4)
    assert total > 0


# ------------------------------------------------------------------ nothing above the threshold
HINT = re.compile(r"0 detections above conf ([\d.]+) in (\d+) images \(best score ([\d.e-]+)\): "
                  r"lower it with (--[\w.]+) ([\d.e-]+)$")


def test_suggested_conf_is_a_round_value_below_the_best_score():
    assert [suggest_conf(s) for s in (0.08, 0.3, 0.012, 0.01, 0.9, 1e-4)] == [0.05, 0.2, 0.01, 0.005, 0.5, 5e-5]
    assert suggest_conf(0.0) is None and suggest_conf(float("nan")) is None
    assert "every score was 0" in no_detections_hint(0.25, 0.0, 3)
    # the advice is below the best score as printed: never "best score 0.01: lower it with --conf 0.01"
    assert no_detections_hint(0.25, 0.010042, 2).endswith("(best score 0.01): lower it with --conf 0.005")


def test_cli_predict_says_why_nothing_was_detected(trained, tmp_path, capsys):
    ckpt, _, images = trained
    src = tmp_path / "imgs"
    src.mkdir()
    for p in images:
        (src / p.name).write_bytes(p.read_bytes())
    args = ["predict", "--source", str(src), "--checkpoint", str(ckpt), "--no-images"]
    assert main([*args, "--save-dir", str(tmp_path / "a"), "--conf", "0.999"]) == 0
    out, err = capsys.readouterr()
    assert f"{len(images)} images, 0 detections" in out
    (line,) = err.strip().splitlines()[-1:]  # one line on stderr, the summary stays on stdout
    conf, n, best, option, lower = HINT.match(line).groups()
    assert (float(conf), int(n), option) == (0.999, len(images), "--conf")
    everything = detectkit.load(ckpt).predict(src, conf=0.0)
    assert float(best) == pytest.approx(max(float(p.scores.max()) for p in everything), rel=1e-2)
    assert float(lower) < float(best)
    # following the advice finds the boxes; a run with detections says nothing on stderr
    assert main([*args, "--save-dir", str(tmp_path / "b"), "--conf", lower]) == 0
    out, err = capsys.readouterr()
    assert json.loads((tmp_path / "b" / "predictions.json").read_text()) and "0 detections" not in err


def test_prediction_writer_rows_and_empty_hint(trained, tmp_path, caplog):
    """``detectkit predict --config`` writes through DetectionWriter: the rows of ``model.predict``,
    and the same one-line hint, naming the recipe option, when nothing passes."""
    from detectkit import DetectionModule
    from detectkit.predict.writer_callback import DetectionWriter

    ckpt, dm, images = trained
    model = detectkit.load(ckpt)
    paths = []
    for conf, name in ((None, "default"), (0.999, "strict")):
        writer = DetectionWriter(output_dir=str(tmp_path / name), save_images=False)
        from detectkit.ops.nms import PostprocessConfig

        post = None if conf is None else PostprocessConfig(conf=conf)
        module = DetectionModule(model, num_classes=3, predict_postprocess=post)
        trainer = tiny_trainer(tmp_path, [writer], 1)
        with caplog.at_level("WARNING", logger="detectkit.predict.writer_callback"):
            trainer.predict(module, dm)
        paths.append(tmp_path / name / "predictions.json")
    rows = json.loads(paths[0].read_text())
    want = sorted(float(s) for p in model.predict(images) for s in p.scores)
    assert rows and sorted(r["score"] for r in rows) == pytest.approx(want, abs=1e-3)
    assert json.loads(paths[1].read_text()) == []
    hints = [r.getMessage() for r in caplog.records if "0 detections" in r.getMessage()]
    assert len(hints) == 1 and HINT.match(hints[0]).group(4) == "--model.predict_postprocess.conf"


def test_one_video_writer_for_the_cli_and_predictions_save(trained, tmp_path):
    import cv2

    from detectkit.predict.writers import VideoWriter

    ckpt, _, images = trained
    frames = [read_image(p) for p in images]
    with VideoWriter(tmp_path / "clip.avi", fps=4) as writer:
        for frame in frames:
            writer.write(frame)
        with pytest.raises(ValueError, match=r"a 10x10 frame in a 80x80 video"):
            writer.write(np.zeros((10, 10, 3), np.uint8))
    out = tmp_path / "out"
    assert main(["predict", "--source", str(tmp_path / "clip.avi"), "--checkpoint", str(ckpt),
                 "--save-dir", str(out)]) == 0
    saved = detectkit.load(ckpt).predict(tmp_path / "clip.avi").save(tmp_path / "saved.mp4")
    for path in (out / "clip.mp4", saved):  # the CLI's annotated copy and Predictions.save
        cap = cv2.VideoCapture(str(path))
        count, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), cap.get(cv2.CAP_PROP_FPS)
        ok, first = cap.read()
        cap.release()
        assert ok and count == len(frames) and fps == pytest.approx(4) and first.shape == (IMAGE, IMAGE, 3)
