"""model.predict end to end through a real yolo_nas_s (stress-transformed fixture weights).

The stress weights (fixtures/yolo_nas_s_parity/README.md, "Stress variant") make a random-weight
YOLO-NAS-S produce real detections above conf 0.25, so NMS, the letterbox inverse and drawing
all have work to do. Inputs are kept at 128 px: the CPU is small and shared.
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import detectkit
from detectkit.data.images import ImageReadError
from detectkit.models.base import Detector
from detectkit.ops import postprocess
from detectkit.predict import ImagePrediction, Predictions, iter_source
from detectkit.predict.sources import SourceOptions

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "fixtures" / "yolo_nas_s_parity" / "yolo_nas_s_random.pth"
SIZE, LONGEST = 128, 124
# The 100x60 test image under (SIZE, LONGEST): scale = min(124/60, 124/100) = 1.24,
# content round(74.4) x 124 = 74 x 124, pad_top = (128-74)//2 = 27, pad_left = (128-124)//2 = 2.
SCALE, PAD_LEFT, PAD_TOP = 1.24, 2, 27


def _test_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)
    img[10:40, 20:70] = (250, 30, 30)
    img[45:58, 75:95] = (20, 20, 240)
    return img


@pytest.fixture(scope="module")
def model():
    if not WEIGHTS.is_file():
        pytest.skip(f"shared test data absent: {WEIGHTS} (needs ../shared next to the checkout)")
    from detectkit.models.yolo_nas.weights import load_super_gradients_checkpoint

    sd = torch.load(WEIGHTS, map_location="cpu", weights_only=True)["net"]
    for k in sd:
        if k.endswith(".running_mean"):
            sd[k] = sd[k] * 0.0625
    for h, (kc, kr) in enumerate([(144.0, 256.0), (352.0, 1024.0), (384.0, 512.0)], start=1):
        sd[f"heads.head{h}.cls_pred.weight"] = sd[f"heads.head{h}.cls_pred.weight"] * kc
        sd[f"heads.head{h}.reg_pred.weight"] = sd[f"heads.head{h}.reg_pred.weight"] * kr
        sd[f"heads.head{h}.reg_pred.bias"] = sd[f"heads.head{h}.reg_pred.bias"] * 8.0
    names = [f"class_{i}" for i in range(80)]
    m = detectkit.create_model("yolo_nas_s", num_classes=80, class_names=names)
    load_super_gradients_checkpoint(m, sd)
    return m.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict_src")
    (root / "one").mkdir()
    Image.fromarray(_test_image()).save(root / "one" / "img.png")
    Image.fromarray(_test_image()).save(root / "served.png")
    return root


@pytest.fixture(scope="module")
def http_url(files):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(files))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/served.png"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def reference(model):
    """Detections computed by hand: letterbox pixels, model, postprocess, inverse mapping."""
    img = _test_image()
    x = torch.full((1, 3, SIZE, SIZE), 114.0)
    content = cv2.resize(img, (124, 74), interpolation=cv2.INTER_LINEAR)
    x[0, :, PAD_TOP : PAD_TOP + 74, PAD_LEFT : PAD_LEFT + 124] = torch.from_numpy(content).permute(2, 0, 1).float()
    with torch.inference_mode():
        det = postprocess(*model(x / 255.0), conf=0.25, iou=0.7, top_k=1000, max_det=300)[0]
    boxes = det[:, :4].clone()
    boxes[:, 0::2] = ((boxes[:, 0::2] - PAD_LEFT) / SCALE).clamp(0, 100)
    boxes[:, 1::2] = ((boxes[:, 1::2] - PAD_TOP) / SCALE).clamp(0, 60)
    return boxes.numpy(), det[:, 4].numpy(), det[:, 5].long().numpy()


@pytest.fixture(scope="module")
def all_sources(model, files, http_url) -> Predictions:
    img = _test_image()
    sources = [
        str(files / "one" / "img.png"),  # path
        Image.fromarray(img),  # PIL
        img,  # HWC RGB array
        torch.from_numpy(img).permute(2, 0, 1).contiguous(),  # CHW uint8 tensor
        (files / "one" / "img.png").as_uri(),  # file:// URL
        http_url,  # http URL (local server)
        files / "one",  # folder (one image)
        str(files / "one" / "*.png"),  # glob
    ]
    return model.predict(sources, conf=0.25, iou=0.7, size=SIZE, longest=LONGEST, batch_size=8)


def test_predict_equals_hand_computed_pipeline(model, all_sources, reference):
    boxes, scores, labels = reference
    assert len(boxes) >= 5  # the stress weights really detect something
    pred = all_sources[2]
    assert isinstance(pred, ImagePrediction)
    assert pred.image.shape == (60, 100, 3)
    assert pred.letterbox.scale == SCALE and pred.letterbox.pad == (PAD_LEFT, PAD_TOP)
    np.testing.assert_allclose(pred.boxes, boxes, atol=1e-3, rtol=0)
    np.testing.assert_allclose(pred.scores, scores, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(pred.labels, labels)
    assert pred.boxes.shape == (len(pred), 4) and pred.labels.dtype == np.int64
    # Original-pixel frame: inside the 100x60 image, and some boxes are not just the whole image.
    assert (pred.boxes >= 0).all() and (pred.boxes[:, 0::2] <= 100).all() and (pred.boxes[:, 1::2] <= 60).all()
    assert (pred.boxes[:, 2] > pred.boxes[:, 0]).all() and (pred.boxes[:, 3] >= pred.boxes[:, 1]).all()
    assert pred.names[0] == f"class_{labels[0]}"


def test_every_source_type_gives_the_same_detections(all_sources):
    assert len(all_sources) == 8 and all_sources.fps is None
    first = all_sources[0]
    for pred in all_sources:
        np.testing.assert_array_equal(pred.image, first.image)
        assert len(pred) == len(first)
        np.testing.assert_allclose(pred.boxes, first.boxes, atol=1e-3, rtol=0)
        np.testing.assert_allclose(pred.scores, first.scores, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(pred.labels, first.labels)
    assert all_sources[0].source.endswith("img.png") and all_sources[5].source.startswith("http://")


def test_conf_filters_and_training_flag_is_restored(model, all_sources):
    base = all_sources[2]
    ordered = np.sort(base.scores)[::-1]
    thr = float(ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # between two detections
    model.train()
    try:
        stream = model.predict(_test_image(), conf=thr, size=SIZE, longest=LONGEST, stream=True)
        assert not isinstance(stream, Predictions) and model.training  # lazy: nothing ran yet
        (high,) = list(stream)
        assert model.training  # restored once the generator is done
    finally:
        model.eval()
    # With top_k not binding, NMS at a higher threshold keeps exactly the survivors above it.
    keep = base.scores > thr
    assert 0 < len(high) < len(base)
    assert (high.scores > thr).all()
    np.testing.assert_allclose(high.boxes, base.boxes[keep], atol=1e-3, rtol=0)
    np.testing.assert_array_equal(high.labels, base.labels[keep])


def test_fuse_uses_a_copy_and_agrees(model, all_sources):
    keys = list(model.state_dict())
    fused = model.predict(_test_image(), size=SIZE, longest=LONGEST, fuse=True)[0]
    assert list(model.state_dict()) == keys  # the caller's model is not fused in place
    base = all_sources[2]
    assert len(fused) == len(base)
    np.testing.assert_allclose(fused.boxes, base.boxes, atol=1e-2, rtol=0)
    np.testing.assert_allclose(fused.scores, base.scores, atol=1e-4, rtol=0)


def test_save_draws_on_an_original_size_image_and_coco_rows(all_sources, tmp_path):
    pred = all_sources[0]
    out = pred.save(tmp_path / "drawn" / "img.png")
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == pred.image.shape
    changed = (drawn != pred.image).any(axis=2)
    assert changed.sum() > 50
    x1, y1 = int(round(pred.boxes[0, 0])), int(round(pred.boxes[0, 1]))
    assert changed[max(0, y1 - 1) : y1 + 2, max(0, x1 - 1) : x1 + 2].any()  # a box corner is drawn

    rows = pred.to_coco(image_id=7)
    assert len(rows) == len(pred)
    x1, y1, x2, y2 = pred.boxes[0].tolist()
    assert rows[0]["image_id"] == 7 and rows[0]["category_id"] == int(pred.labels[0]) + 1  # no mapping: label + 1
    assert rows[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert rows[0]["score"] == pytest.approx(float(pred.scores[0]))
    assert pred.to_coco(1, category_ids=list(range(100, 180)))[0]["category_id"] == 100 + int(pred.labels[0])

    folder = Predictions([pred, all_sources[1], pred]).save(tmp_path / "many")
    assert sorted(p.name for p in folder.iterdir()) == ["000001.jpg", "img.jpg", "img_000002.jpg"]


def test_show_is_headless_safe(all_sources):
    import matplotlib

    matplotlib.use("Agg")
    with pytest.warns(UserWarning, match="cannot display"):
        all_sources[0].show()


def test_video_source_one_prediction_per_frame(model, tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (100, 60))
    frames = [np.zeros((60, 100, 3), np.uint8) for _ in range(2)]
    frames[0][:, :50] = (220, 30, 30)  # red left half, blue right half
    frames[0][:, 50:] = (30, 30, 220)
    frames[1][:] = (30, 200, 30)
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()

    preds = model.predict(str(path), size=SIZE, longest=LONGEST, batch_size=2)
    assert len(preds) == 2 and preds.fps == pytest.approx(5.0)
    assert [p.source for p in preds] == [f"{path}#{i}" for i in range(2)]
    for pred, frame in zip(preds, frames):
        assert pred.image.shape == (60, 100, 3)
        # RGB order kept: flat regions come back within MJPG's loss
        assert np.abs(pred.image[5:55, 5:45].astype(int) - frame[5:55, 5:45]).max() < 20
    # The same video through a file:// URL (downloaded to a temporary file, then decoded).
    via_url = list(iter_source(path.as_uri()))
    assert len(via_url) == 2 and via_url[0].fps == pytest.approx(5.0)
    for got, pred in zip(via_url, preds):
        np.testing.assert_array_equal(got.image, pred.image)
    out = preds.save(tmp_path / "out.avi")
    cap = cv2.VideoCapture(str(out))
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, first = cap.read()
    cap.release()
    assert ok and count == 2 and first.shape == (60, 100, 3)


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.jpg"):
        list(iter_source(tmp_path / "no_such.jpg"))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        list(iter_source(bad))
    with pytest.raises(TypeError, match="unsupported source type float"):
        list(iter_source(4.2))
    with pytest.raises(ValueError, match="cannot open webcam42"):  # an int is a webcam index; none here
        list(iter_source(42, SourceOptions(retries=0, timeout=1)))
    with pytest.raises(TypeError, match="uint8"):
        list(iter_source(np.zeros((8, 8, 3), np.float32)))
    with pytest.raises(FileNotFoundError, match="cannot download"):
        list(iter_source((tmp_path / "gone.png").as_uri()))
    from detectkit.predict import predict

    conv = torch.nn.Conv2d(3, 4, 1).train()
    with pytest.raises(TypeError, match=r"must return \(boxes"):
        predict(conv, np.zeros((8, 8, 3), np.uint8), size=32, longest=None)
    assert conv.training
    with pytest.raises(ValueError, match="multiple of the model's largest stride"):
        predict(Detector(2, bins=17), np.zeros((8, 8, 3), np.uint8), size=100)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list(iter_source(tmp_path / "empty"))


def test_array_layouts_decode_to_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (frame,) = iter_source(gray)
    assert frame.image.shape == (3, 4, 3) and (frame.image[..., 2] == gray).all()
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0] = 9
    (frame,) = iter_source(rgba)
    assert frame.image.shape == (5, 6, 3) and (frame.image[..., 0] == 9).all()
    batch = np.zeros((2, 5, 6, 3), np.uint8)
    assert len(list(iter_source(batch))) == 2


def test_draw_hand_made_box(tmp_path):
    img = np.full((60, 100, 3), 40, np.uint8)
    pred = ImagePrediction(img, np.array([[20.0, 30.0, 80.0, 55.0]], np.float32), np.array([0.9], np.float32),
                           np.array([3]), class_names=["a", "b", "c", "shark"])
    assert pred.names == ["shark"]
    drawn = np.asarray(Image.open(pred.save(tmp_path / "d.png")).convert("RGB"))
    assert drawn.shape == img.shape
    assert (drawn[42, 20] != 40).any() and (drawn[42, 80] != 40).any()  # left and right edges
    assert (drawn[54, 50] != 40).any() or (drawn[55, 50] != 40).any()  # bottom edge
    assert (drawn[45, 50] == 40).all() and (drawn[5, 5] == 40).all()  # inside and far outside untouched
    assert (drawn[15:29, 20:60] != 40).any()  # the label sits above the box
    np.testing.assert_array_equal(pred.image, img)  # drawing works on a copy
