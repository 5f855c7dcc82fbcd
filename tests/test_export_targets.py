"""Export targets beyond ONNX: OpenVINO IR and TorchScript, each run in its own runtime and compared
with PyTorch; ``serve --backend openvino`` answers like ``model.predict``; CoreML/TFLite say why not.

YOLO-NAS-S (random init, head spread so it detects something) at 64 px keeps each export to
seconds. Tolerance: the export's ``max_abs_error`` (boxes relative to the image side, and scores,
before and after NMS) must be <= 1e-3, the same bound as the ONNX export.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest
import torch
from model_helpers import spread_untrained_head  # noqa: E402

from detectkit import create_model
from detectkit.checkpoint import save_weights
from detectkit.cli import main as cli_main
from detectkit.export.deploy import ExportCheckError, ExportConfig, ExportResult
from detectkit.models.base import InferenceDefaults
from detectkit.ops.nms import PostprocessConfig, postprocess

TOLERANCE = 1e-3  # README "Export": the one bound every target is checked to
SIZE = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("yolo_nas_s", num_classes=3).eval()
    spread_untrained_head(model)
    model.class_names = ["cat", "dog", "bird"]
    model.inference = InferenceDefaults(image_size=(SIZE, SIZE), longest=None,
                                        postprocess=PostprocessConfig(conf=0.2, iou=0.6, max_det=50))
    return save_weights(model, tmp_path_factory.mktemp("targets") / "nas.ckpt"), model


def _export(*args: str) -> dict:
    """``detectkit export ARGS``: its exit code must be 0; returns its JSON summary line."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["export", *args]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def openvino_ir(checkpoint, tmp_path_factory):
    """The CLI's default OpenVINO export (NMS in graph) of the checkpoint: (IR path, summary)."""
    pytest.importorskip("openvino")
    folder = tmp_path_factory.mktemp("ir")
    xml = folder / "nas.xml"
    return xml, _export("--checkpoint", str(checkpoint[0]), "--format", "openvino", "--output", str(xml))


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand((n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def test_openvino_export_matches_pytorch_with_nms_in_graph(checkpoint, openvino_ir):
    import openvino as ov

    _, model = checkpoint
    xml, summary = openvino_ir
    assert summary["runtime"] == "OpenVINO" and summary["path"] == str(xml)
    assert summary["raw_compared"] and summary["detections_match"] and summary["num_detections"] > 0
    assert summary["max_abs_error"] <= TOLERANCE
    assert xml.is_file() and xml.with_suffix(".bin").is_file() and not list(xml.parent.glob("*.onnx"))
    assert summary["output_names"] == ["num_predictions", "pred_boxes", "pred_scores", "pred_classes"]

    # independently of the export's own check: the IR in OpenVINO on a new batch of 3 (dynamic batch)
    from detectkit.export.openvino import compile_openvino

    x = _images(3, seed=5)
    compiled = compile_openvino(xml)
    result = compiled(x.numpy())
    num, boxes, scores, classes = (result[o] for o in compiled.outputs)
    with torch.no_grad():
        ref = postprocess(*model.eval()(x), conf=0.2, iou=0.6, max_det=50)
    assert num.shape == (3, 1) and sum(len(r) for r in ref) > 0
    for i, r in enumerate(ref):
        n = int(num[i, 0])
        assert n == len(r)
        order = np.argsort(-scores[i, :n], kind="stable")
        r = r[torch.argsort(-r[:, 4], stable=True)].numpy()
        np.testing.assert_allclose(boxes[i, :n][order] / SIZE, r[:, :4] / SIZE, atol=TOLERANCE)
        np.testing.assert_allclose(scores[i, :n][order], r[:, 4], atol=TOLERANCE)
        np.testing.assert_array_equal(classes[i, :n][order], r[:, 5])
    assert ov.Core().read_model(str(xml)).inputs[0].get_partial_shape()[0].is_dynamic


def test_openvino_check_catches_an_ir_that_differs(checkpoint, openvino_ir):
    """The check is real: the IR compared with a different PyTorch model is an error, not a pass
    (before NMS, on the raw boxes/scores tapped inside the IR)."""
    from detectkit.export.openvino import check_openvino

    xml, _ = openvino_ir
    config = ExportConfig(image_size=SIZE, nms="batch", conf=0.2, iou=0.6, max_det=50)
    passed = check_openvino(checkpoint[1], xml, config, result=ExportResult("", "", (), "", []))
    assert passed.runtime == "OpenVINO" and passed.detections_match and passed.max_abs_error <= TOLERANCE
    other = create_model("yolo_nas_s", num_classes=3).eval()
    with pytest.raises(ExportCheckError, match="OpenVINO differs from PyTorch before NMS"):
        check_openvino(other, xml, config)


def test_torchscript_export_matches_pytorch(checkpoint, tmp_path):
    path, model = checkpoint
    out = tmp_path / "nas.torchscript"
    summary = _export("--checkpoint", str(path), "--format", "torchscript", "--output", str(out), "--uint8",
                      "--layout", "nhwc")
    assert summary["runtime"] == "torch.jit" and summary["raw_compared"] and summary["max_abs_error"] <= TOLERANCE
    assert summary["input_dtype"] == "uint8" and summary["input_shape"] == [1, SIZE, SIZE, 3]

    # traced at batch 1, loaded without detectkit, run at batch 3 on uint8 NHWC images
    scripted = torch.jit.load(str(out))
    pixels = torch.randint(0, 256, (3, SIZE, SIZE, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    with torch.no_grad():
        boxes, scores = scripted(pixels)
        ref_boxes, ref_scores = model.eval()(pixels.permute(0, 3, 1, 2).float() / 255.0)
    assert boxes.shape == ref_boxes.shape and boxes.shape[0] == 3
    assert float((boxes - ref_boxes).abs().max()) / SIZE <= TOLERANCE
    assert float((scores - ref_scores).abs().max()) <= TOLERANCE


def test_unavailable_targets_are_one_line(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    for fmt, package in (("coreml", "coremltools"), ("tflite", "litert-torch")):
        assert cli_main(["export", "--checkpoint", str(path), "--format", fmt]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--format {fmt}" in err and "Traceback" not in err
        assert f"'{package}'" in err and (fmt != "coreml" or "macOS" in err)
    assert cli_main(["export", "--checkpoint", str(path), "--format", "torchscript", "--nms", "batch"]) == 1
    assert "raw boxes and scores" in capsys.readouterr().err


def test_serve_openvino_backend_answers_like_model_predict(checkpoint, tmp_path):
    pytest.importorskip("openvino")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("litserve")
    from PIL import Image

    from detectkit.serve.launch import LocalServer

    path, model = checkpoint
    rng = np.random.default_rng(3)
    img = np.full((80, 120, 3), 90, np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, 60), rng.integers(0, 100)
        img[y : y + 20, x : x + 30] = rng.integers(0, 256, 3)
    png = tmp_path / "img.png"
    Image.fromarray(img).save(png)
    with LocalServer(path, "--backend", "openvino", "--threads", "1", "--max-batch", "1", "--cache-dir",
                     str(tmp_path / "cache"), log_path=tmp_path / "server.log", env={"OMP_NUM_THREADS": "1"}) as server:
        response = httpx.post(server.url + "/predict", content=png.read_bytes(), headers={"content-type": "image/png"},
                              timeout=60)
        info = httpx.get(server.url + "/info", timeout=10).json()
    assert response.status_code == 200, response.text
    assert "openvino" in json.dumps(info)
    assert len(list((tmp_path / "cache").glob("*.xml"))) == 1
    dets = response.json()["detections"]
    expected = model.predict(img, conf=0.2, iou=0.6, max_det=50, size=(SIZE, SIZE), longest=None)[0]
    assert len(dets) == len(expected.boxes) > 0
    got = np.array(sorted([d["score"], d["label"], *d["bbox"]] for d in dets))
    xyxy = np.asarray(expected.boxes)
    ref = np.array(sorted([float(s), int(c), x1, y1, x2 - x1, y2 - y1]
                          for s, c, (x1, y1, x2, y2) in zip(expected.scores, expected.labels, xyxy)))
    np.testing.assert_allclose(got[:, 0], ref[:, 0], atol=TOLERANCE)  # scores
    np.testing.assert_array_equal(got[:, 1], ref[:, 1])  # classes
    np.testing.assert_allclose(got[:, 2:], ref[:, 2:], atol=0.05)  # COCO [x, y, w, h] in original pixels


def test_serve_openvino_refuses_a_gpu_device_in_one_line():
    from detectkit.serve.backends import BackendUnavailable, check_openvino

    check_openvino("cpu")  # installed here: no error
    with pytest.raises(BackendUnavailable, match="--backend openvino runs on the CPU; pass --device cpu"):
        check_openvino("cuda:0")


def test_openvino_missing_names_its_extra(checkpoint, tmp_path, monkeypatch, capsys):
    """Without the package, --format openvino is one line naming the extra, and no file is left."""
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    out = tmp_path / "nas.xml"
    assert cli_main(["export", "--checkpoint", str(checkpoint[0]), "--format", "openvino", "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("detectkit export: error: detectkit export needs the package 'openvino', which is not installed: "
                   "pip install 'detectkit[openvino]'")
    assert list(tmp_path.iterdir()) == []
