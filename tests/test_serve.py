"""``detectkit serve`` end to end: the real server (LitServe, subprocess) on a free 127.0.0.1 port.

Two servers are started (each ~10 s on an idle 2-core machine): a YOLO-NAS one (detections
equal ``model.predict``; every bad request gets its 4xx and the server keeps serving; metrics)
and a YOLO-World one with an embeddings-file text encoder and a long batch window, so
concurrent requests land in one batch (per-request vocabularies through the masked path; then
SIGTERM while requests are queued: none is lost).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("litserve")

from model_helpers import spread_untrained_head  # noqa: E402

from detectkit import create_model  # noqa: E402
from detectkit.checkpoint import save_weights  # noqa: E402
from detectkit.models.base import InferenceDefaults  # noqa: E402
from detectkit.models.yolo_world.text import EmbeddingsFileEncoder  # noqa: E402
from detectkit.ops.nms import PostprocessConfig  # noqa: E402
from detectkit.serve.api import load_detector  # noqa: E402
from detectkit.serve.launch import LocalServer, ServerNotReady, free_port  # noqa: E402

START_TIMEOUT = 180  # the shared dev machine can be slow to spawn workers; an idle one takes ~10 s
WORLD_VOCAB = ["cat", "dog", "person", "car", "tree", "boat", "kite"]


def _save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    return save_weights(model, path)  # the record detectkit.load reads: vocabulary, inference, category ids


def _image(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 90, np.uint8)
    for _ in range(4):  # a few flat rectangles: structure for the random detector to respond to
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[y : y + rng.integers(8, h // 2), x : x + rng.integers(8, w // 2)] = rng.integers(0, 256, 3)
    return img


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class Server(LocalServer):
    """A server on the test checkpoint, one torch thread; killed (not drained) at the end of a test."""

    def __init__(self, checkpoint: Path, *extra: str) -> None:
        port = free_port()
        super().__init__(checkpoint, "--threads", "1", "--cache-dir", str(checkpoint.parent / "cache"), *extra,
                         port=port, log_path=checkpoint.with_suffix(f".{port}.log"), env={"OMP_NUM_THREADS": "1"},
                         start_timeout=START_TIMEOUT)

    def post(self, **kwargs) -> httpx.Response:
        return httpx.post(self.url + "/predict", timeout=60, **kwargs)

    def stop(self, graceful: bool = False, timeout: float = 30.0) -> None:
        super().stop(graceful, timeout)


def test_a_server_that_cannot_start_says_why(tmp_path):
    """A missing checkpoint: the launcher reports the exit and the server's own error naming the file,
    instead of waiting out the start timeout."""
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(ServerNotReady, match="server exited with") as err:  # not "not ready within 60 s"
        LocalServer(missing, log_path=tmp_path / "server.log", start_timeout=60)
    assert "nope.ckpt" in str(err.value)


# ---------------------------------------------------------------------------------- YOLO-NAS
@pytest.fixture(scope="module")
def nas_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("yolo_nas_s", num_classes=3).eval()
    spread_untrained_head(model)
    model.class_names = ["cat", "dog", "bird"]
    model.category_ids = [3, 7, 11]
    model.inference = InferenceDefaults(image_size=(96, 96), longest=None,
                                        postprocess=PostprocessConfig(conf=0.2, iou=0.6, max_det=50))
    path = _save_checkpoint(model, tmp_path_factory.mktemp("nas") / "nas.ckpt")
    return path, load_detector(path)


@pytest.fixture(scope="module")
def nas(nas_checkpoint):
    path, model = nas_checkpoint
    server = Server(path, "--max-batch", "4", "--batch-timeout-ms", "20", "--max-body-mb", "1",
                    "--max-pixels", "1000000")
    yield server, model
    server.stop()


def _expected(model, img: np.ndarray, **overrides):
    inf = model.inference
    post = inf.postprocess.replace(**overrides)
    return model.predict(img, conf=post.conf, iou=post.iou, max_det=post.max_det, size=inf.image_size,
                         longest=inf.longest)[0]


def _assert_same(response: dict, expected, category_ids=None) -> None:
    dets = response["detections"]
    assert len(dets) == len(expected.boxes) > 0
    got = np.array([[*d["bbox"], d["score"], d["label"]] for d in dets])
    xyxy = expected.boxes
    ref = np.column_stack([xyxy[:, 0], xyxy[:, 1], xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1],
                           expected.scores, expected.labels])
    def order(a: np.ndarray) -> np.ndarray:  # by score, then class and box (ties: equal-score duplicates)
        r = np.round(a, 3)
        return a[np.lexsort((r[:, 3], r[:, 2], r[:, 1], r[:, 0], r[:, 5], -r[:, 4]))]

    got, ref = order(got), order(ref)
    np.testing.assert_array_equal(got[:, 5], ref[:, 5])
    np.testing.assert_allclose(got[:, 4], ref[:, 4], atol=1e-4)
    np.testing.assert_allclose(got[:, :4], ref[:, :4], atol=0.05)
    for d in dets:
        assert d["class_name"] == expected.class_names[d["label"]]
        want = category_ids[d["label"]] if category_ids is not None else d["label"] + 1
        assert d["category_id"] == want


def test_detections_equal_model_predict(nas):
    server, model = nas
    images = [_image(1, 120, 160), _image(2, 200, 90), _image(3, 64, 64)]
    # raw bytes, multipart and JSON base64, sent concurrently so they share batches
    calls = [
        lambda: server.post(content=_png(images[0]), headers={"content-type": "image/png"}),
        lambda: server.post(files={"image": ("b.png", _png(images[1]), "image/png")}, data={"conf": "0.3"}),
        lambda: server.post(json={"image": base64.b64encode(_png(images[2])).decode(), "max_det": 5, "iou": 0.5}),
    ]
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda f: f(), calls))
    for r in responses:
        assert r.status_code == 200, r.text
    _assert_same(responses[0].json(), _expected(model, images[0]), model.category_ids)
    _assert_same(responses[1].json(), _expected(model, images[1], conf=0.3), model.category_ids)
    _assert_same(responses[2].json(), _expected(model, images[2], max_det=5, iou=0.5), model.category_ids)
    assert len(responses[2].json()["detections"]) <= 5
    assert responses[1].json()["width"] == 90 and responses[1].json()["height"] == 200


def test_an_empty_response_says_why_and_what_conf_to_send(nas):
    server, model = nas
    img = _image(5, 120, 160)
    r = server.post(json={"image": base64.b64encode(_png(img)).decode(), "conf": 0.999})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["detections"] == []
    everything = _expected(model, img, conf=0.0)  # the best box survives NMS: its score is the best seen
    assert body["best_score"] == pytest.approx(float(everything.scores.max()), abs=1e-3)
    m = re.fullmatch(r"0 detections above conf 0.999 \(best score [\d.e-]+\): "
                     r'lower it with "conf": ([\d.e-]+) in the request', body["hint"])
    assert m and float(m.group(1)) < body["best_score"]
    again = server.post(json={"image": base64.b64encode(_png(img)).decode(), "conf": float(m.group(1))}).json()
    assert "hint" not in again
    _assert_same(again, _expected(model, img, conf=float(m.group(1))), model.category_ids)


def test_annotated_image(nas):
    server, _ = nas
    r = server.post(content=_png(_image(4, 100, 100)), headers={"content-type": "image/png"},
                    params={"annotate": "true"})
    assert r.status_code == 200, r.text
    drawn = Image.open(io.BytesIO(base64.b64decode(r.json()["annotated_image"])))
    assert drawn.format == "JPEG" and drawn.size == (100, 100)


def test_onnxruntime_backend_equals_model_predict(nas_checkpoint, tmp_path):
    """The ORT backend (exported once, cached by checkpoint content) through the same API steps, in-process."""
    pytest.importorskip("onnxruntime")
    from detectkit.predict.pipeline import resolve_settings
    from detectkit.serve.api import DetectionAPI
    from detectkit.serve.backends import prepare_onnx
    from detectkit.serve.preprocess import prepare

    path, model = nas_checkpoint
    onnx = prepare_onnx(model, path, tmp_path)
    assert prepare_onnx(model, path, tmp_path) == onnx and len(list(tmp_path.glob("*.onnx"))) == 1
    api = DetectionAPI(path, backend="onnxruntime", model_file=onnx, max_batch=4)
    api.setup("cpu")
    images = [_image(11, 100, 140), _image(12, 70, 70)]
    st = resolve_settings(model)
    letterbox = {"size": st.size, "longest": st.longest, "center": st.center, "pad_value": st.pad_value}
    items = [api.decode_request(prepare(_png(img), letterbox, 10**7, False)) for img in images]
    outputs = api.unbatch(api.predict(api.batch(items)))
    for img, out in zip(images, outputs):
        _assert_same(api.encode_response(out), _expected(model, img), model.category_ids)


def _bomb_png(side: int) -> bytes:
    """A valid PNG header announcing side x side pixels, with a tiny (highly compressed) body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    raw = zlib.compress(b"\x00" * (side + 1) * 8, 9)
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_bad_requests_get_4xx_and_server_keeps_serving(nas):
    server, _ = nas
    good = _png(_image(5, 80, 80))
    png = {"content-type": "image/png"}
    cases = {
        "corrupt": (400, dict(content=b"\x89PNG\r\n\x1a\n" + os.urandom(300), headers=png)),
        "truncated": (400, dict(content=good[: len(good) // 2], headers=png)),
        "bomb": (413, dict(content=_bomb_png(20000), headers=png)),
        "content type": (415, dict(content=b"hello", headers={"content-type": "text/plain"})),
        "empty body": (400, dict(content=b"", headers=png)),
        "oversized": (413, dict(content=b"\0" * (1024 * 1024 + 1), headers=png)),
        "bad json": (400, dict(content=b"{not json", headers={"content-type": "application/json"})),
        "bad base64": (400, dict(json={"image": "@@@not base64@@@"})),
        "no image field": (422, dict(json={"conf": 0.5})),
        "conf out of range": (422, dict(content=good, headers=png, params={"conf": "1.5"})),
        "max_det not int": (422, dict(json={"image": base64.b64encode(good).decode(), "max_det": 2.5})),
        "unknown field": (422, dict(json={"image": base64.b64encode(good).decode(), "confidence": 0.5})),
        "empty vocabulary": (422, dict(json={"image": base64.b64encode(good).decode(), "classes": []})),
        "classes on a fixed-vocabulary model": (400, dict(json={"image": base64.b64encode(good).decode(),
                                                                "classes": ["cat"]})),
        "multipart without image": (422, dict(files={"photo": ("x.png", good, "image/png")})),
    }
    for name, (status, kwargs) in cases.items():
        r = server.post(**kwargs)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        assert r.json()["error"], name
        ok = server.post(content=good, headers=png)  # the next good request still succeeds
        assert ok.status_code == 200, f"after {name}: {ok.status_code} {ok.text}"
    # a bad image in the same batch as good ones fails alone
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda body: server.post(content=body, headers=png), [good, b"junk" * 10, good, good]))
    assert [r.status_code for r in rs] == [200, 400, 200, 200]


def test_health_and_metrics(nas):
    server, _ = nas
    assert httpx.get(server.url + "/live").status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ("detectkit_requests_total", "detectkit_batch_size_bucket", "detectkit_queue_seconds_count",
                 "detectkit_inference_seconds_count", "detectkit_request_seconds_count"):
        assert name in text
    assert 'detectkit_requests_total{status="200"}' in text and 'status="415"' in text
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "request" and e.get("status") == 200 for e in lines)


# ---------------------------------------------------------------------------------- YOLO-World
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    table = {n: torch.nn.functional.normalize(torch.randn(512), dim=0) for n in WORLD_VOCAB}
    torch.save(table, root / "vocab.pt")
    encoder = EmbeddingsFileEncoder(root / "vocab.pt")
    model = create_model("yolo_world_v2_s", num_classes=2).eval()
    model.set_text_embeddings(encoder.encode(["cat", "dog"]), ["cat", "dog"])
    with torch.no_grad():  # sharpen the untrained scorer and shrink its boxes so detections vary
        for name, p in model.named_parameters():
            if name.startswith("head.cv4") and name.endswith("logit_scale"):
                p.fill_(2.5)
            elif name.startswith("head.cv4") and name.endswith(".bias") and "norm" not in name:
                p.fill_(-3.0)
        for branch in model.head.cv2:
            branch[-1].weight.normal_(0, 0.05)
            branch[-1].bias.copy_(-0.5 * torch.arange(16.0).repeat(4))
    model.inference = InferenceDefaults(image_size=(64, 64), longest=None,
                                        postprocess=PostprocessConfig(conf=0.05))
    path = _save_checkpoint(model, root / "world.ckpt")
    server = Server(path, "--text-encoder", str(root / "vocab.pt"), "--max-batch", "8",
                    "--batch-timeout-ms", "3000")
    yield server, load_detector(path), encoder
    server.stop()


def test_world_vocabularies_batched_together(world):
    server, model, encoder = world
    img = np.random.default_rng(7).integers(0, 256, (64, 80, 3), dtype=np.uint8)  # texture: few score ties
    vocabularies = [["person", "car", "tree"], None, ["kite"], ["boat", "cat", "dog", "person", "tree"]]

    def call(vocab):
        body = {"image": base64.b64encode(_png(img)).decode(), "conf": 0.05}
        if vocab is not None:
            body["classes"] = vocab
        return server.post(json=body)

    with ThreadPoolExecutor(len(vocabularies)) as pool:
        responses = list(pool.map(call, vocabularies))
    for _ in range(50):  # worker figures reach /metrics through LitServe's logger process
        batch = _metric(server, "detectkit_batch_size_sum"), _metric(server, "detectkit_batch_size_count")
        if batch[1]:
            break
        time.sleep(0.1)
    assert batch == (4.0, 1.0), "the four requests should have shared one batch"
    for vocab, r in zip(vocabularies, responses):
        assert r.status_code == 200, r.text
        names = vocab or ["cat", "dog"]
        reference = model if vocab is None else _with_vocabulary(model, encoder, vocab)
        expected = _expected(reference, img, conf=0.05)
        _assert_same(r.json(), expected)
        assert {d["class_name"] for d in r.json()["detections"]} <= set(names)
    r = server.post(json={"image": base64.b64encode(_png(img)).decode(), "classes": ["unicorn"]})
    assert r.status_code == 422 and "unicorn" in r.json()["error"]


def _metric(server: Server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _with_vocabulary(model, encoder, names):
    import copy

    other = copy.deepcopy(model)
    other.set_text_embeddings(encoder.encode(names), names)
    return other


def test_sigterm_drains_accepted_requests(world):
    server, _, _ = world
    img = base64.b64encode(_png(_image(8, 64, 64))).decode()
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(server.post, json={"image": img}) for _ in range(6)]
        deadline = time.monotonic() + 30
        while _metric(server, "detectkit_requests_in_flight") < 6 and time.monotonic() < deadline:
            time.sleep(0.05)  # all six accepted and waiting in the 3 s batch window
        assert _metric(server, "detectkit_requests_in_flight") == 6
        os.killpg(server.proc.pid, signal.SIGTERM)  # the whole group, as systemd or `timeout` do
        time.sleep(0.2)
        try:
            late = server.post(json={"image": img})
        except httpx.TransportError:  # already closed: also a clean refusal
            late = None
        results = [f.result(timeout=60) for f in futures]
    assert [r.status_code for r in results] == [200] * 6, [r.text for r in results]
    assert all("detections" in r.json() for r in results)
    if late is not None:  # refused cleanly while draining, never half-served
        assert late.status_code == 503
    assert server.proc.wait(timeout=60) == 0, server.output()
    assert '"drain_end"' in server.output()


def test_cli_errors_are_one_line(nas_checkpoint, tmp_path, monkeypatch, capsys):
    from detectkit.serve.backends import BackendUnavailable, check_tensorrt
    from detectkit.serve.commands import main

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    # the server's JSON log handlers would outlive this test in the pytest process
    monkeypatch.setattr("detectkit.serve.metrics.configure_json_logging", lambda level="info": None)
    assert main(["--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt: file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(broken)]) == 2
    assert "broken.ckpt" in capsys.readouterr().err
    try:
        check_tensorrt("cuda")
    except BackendUnavailable:
        assert main(["--checkpoint", str(nas_checkpoint[0]), "--backend", "tensorrt", "--device", "cpu"]) == 2
        assert "tensorrt" in capsys.readouterr().err
