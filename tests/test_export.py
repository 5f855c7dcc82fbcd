"""Export: ONNX with dynamic batch, embedded NMS (SG formats), uint8 input, TensorRT graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from compress_helpers import TinyDetector

from detectkit.export.deploy import ExportConfig, ExportResult, example_input, export_detector, run_onnx
from detectkit.export.nms import NMSPostprocess, split_batch, split_flat
from detectkit.export.tensorrt import add_efficient_nms, build_engine, tensorrt_available
from detectkit.ops.nms import postprocess


@pytest.fixture(scope="module")
def tiny() -> TinyDetector:
    torch.manual_seed(0)
    return TinyDetector(num_classes=3).eval().fuse()


def test_raw_export_dynamic_batch(tiny, tmp_path):
    res = export_detector(tiny, tmp_path / "raw.onnx", ExportConfig(image_size=64))
    assert res.max_abs_error is not None and res.max_abs_error < 1e-4
    x = torch.rand(3, 3, 64, 64)
    boxes, scores = run_onnx(res.path, x)
    with torch.no_grad():
        ref_boxes, ref_scores = tiny(x)
    assert boxes.shape == (3, 84, 4) and scores.shape == (3, 84, 3)
    np.testing.assert_allclose(boxes, ref_boxes.numpy(), atol=1e-3)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-5)


@pytest.mark.parametrize("fmt,multi_label", [("batch", True), ("flat", False)])
def test_nms_graph_matches_postprocess(tiny, tmp_path, fmt, multi_label):
    # max_det smaller than the survivors: exercises the per-image rank cap and padding
    cfg = ExportConfig(image_size=64, nms=fmt, conf=0.35, iou=0.5, max_det=7, multi_label=multi_label)
    res = export_detector(tiny, tmp_path / f"{fmt}.onnx", cfg)
    assert res.detections_match and res.op_counts["NonMaxSuppression"] == 1
    x = torch.rand(3, 3, 64, 64)
    outs = run_onnx(res.path, x)
    with torch.no_grad():
        ref = postprocess(*tiny(x), conf=0.35, iou=0.5, max_det=7, multi_label=multi_label)
    assert sum(len(r) for r in ref) > 6  # the scores pass the threshold: the comparison means something
    if fmt == "batch":
        num, boxes, scores, classes = outs
        assert num.shape == (3, 1) and num.dtype == np.int64
        assert boxes.shape == (3, 7, 4) and boxes.dtype == np.float32
        assert scores.shape == (3, 7) and classes.shape == (3, 7) and classes.dtype == np.int64
        for i, r in enumerate(ref):
            assert int(num[i, 0]) == len(r)
            assert (scores[i, len(r):] == -1).all() and (classes[i, len(r):] == -1).all()
            assert np.all(np.diff(scores[i, : len(r)]) <= 0)  # descending
        got = split_batch(*outs)
    else:
        (flat,) = outs
        assert flat.ndim == 2 and flat.shape[1] == 7 and flat.dtype == np.float32
        assert np.all(np.diff(flat[:, 0]) >= 0)  # image-major
        got = split_flat(flat, 3)
    for r, g in zip(ref, got):
        r = r.numpy()
        assert len(r) == len(g)
        np.testing.assert_allclose(np.sort(r[:, 4]), np.sort(g[:, 4]), atol=1e-5)
        order_r, order_g = np.argsort(-r[:, 4], kind="stable"), np.argsort(-g[:, 4], kind="stable")
        np.testing.assert_allclose(r[order_r, :4], g[order_g, :4], atol=1e-3)
        np.testing.assert_array_equal(r[order_r, 5], g[order_g, 5])


def test_nms_module_eager_equals_postprocess(tiny):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        boxes, scores = tiny(x)
    num, b, s, c = NMSPostprocess(conf=0.3, iou=0.6, max_det=50)(boxes, scores)
    ref = postprocess(boxes, scores, conf=0.3, iou=0.6, max_det=50)
    for i, r in enumerate(ref):
        assert int(num[i]) == len(r)
        torch.testing.assert_close(s[i, : len(r)], r[:, 4])


@pytest.mark.parametrize("layout,order", [("nhwc", "bgr"), ("nchw", "rgb")])
def test_uint8_input_embeds_preprocessing(tiny, tmp_path, layout, order):
    cfg = ExportConfig(image_size=64, uint8_input=True, layout=layout, channel_order=order)
    res = export_detector(tiny, tmp_path / "u8.onnx", cfg)
    assert res.input_dtype == "uint8"
    raw = example_input(cfg, batch_size=2, seed=3)
    assert raw.dtype == torch.uint8 and raw.shape == ((2, 64, 64, 3) if layout == "nhwc" else (2, 3, 64, 64))
    rgb = raw.permute(0, 3, 1, 2) if layout == "nhwc" else raw
    if order == "bgr":
        rgb = rgb.flip(1)
    with torch.no_grad():
        ref_boxes, _ = tiny(rgb.float() / 255)
    boxes, _ = run_onnx(res.path, raw)
    np.testing.assert_allclose(boxes, ref_boxes.numpy(), atol=1e-3)


def test_efficient_nms_graph(tiny, tmp_path):
    raw = export_detector(tiny, tmp_path / "raw.onnx", ExportConfig(image_size=64)).path
    trt_path = add_efficient_nms(raw, tmp_path / "trt.onnx", conf=0.3, iou=0.6, max_det=40)
    graph = gs.import_onnx(onnx.load(trt_path))
    (node,) = [n for n in graph.nodes if n.op == "EfficientNMS_TRT"]
    assert node.attrs["max_output_boxes"] == 40 and node.attrs["background_class"] == -1
    assert node.attrs["box_coding"] == 0 and node.attrs["score_activation"] == 0
    assert node.attrs["plugin_version"] == "1"
    assert abs(node.attrs["score_threshold"] - 0.3) < 1e-6 and abs(node.attrs["iou_threshold"] - 0.6) < 1e-6
    assert [t.name for t in node.inputs] == ["boxes", "scores"]
    assert node.inputs[0].shape[1:] == [84, 4] and node.inputs[1].shape[1:] == [84, 3]
    outs = {t.name: (t.dtype, t.shape) for t in graph.outputs}
    assert outs["num_dets"] == (np.int32, ["batch", 1])
    assert outs["det_boxes"] == (np.float32, ["batch", 40, 4])
    assert outs["det_scores"] == (np.float32, ["batch", 40])
    assert outs["det_classes"] == (np.int32, ["batch", 40])
    # everything up to the plugin runs in onnxruntime and equals PyTorch
    graph.outputs = list(node.inputs)
    graph.nodes.remove(node)
    graph.cleanup()
    sub = tmp_path / "pre_nms.onnx"
    onnx.save(gs.export_onnx(graph), sub)
    x = torch.rand(2, 3, 64, 64)
    boxes, scores = run_onnx(sub, x)
    with torch.no_grad():
        ref_boxes, ref_scores = tiny(x)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-5)
    np.testing.assert_allclose(boxes, ref_boxes.numpy(), atol=1e-3)


@pytest.mark.skipif(tensorrt_available(), reason="this machine builds real engines")
def test_engine_falls_back_to_trtexec_script(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"")
    script = build_engine(onnx_path, input_shape=(1, 3, 640, 640), int8=True, max_batch=4)
    text = script.read_text()
    assert script.name == "m.trtexec.sh"
    assert f"--onnx={onnx_path}" in text and "--int8" in text and "--fp16" in text
    assert "--minShapes=images:1x3x640x640" in text and "--maxShapes=images:4x3x640x640" in text


def test_yolo_nas_s_fused_export_with_nms(tmp_path):
    from detectkit import create_model

    torch.manual_seed(0)
    model = create_model("yolo_nas_s", num_classes=4).eval()
    with torch.no_grad():
        before = model(torch.rand(1, 3, 64, 64))
    model.fuse()
    # the head's prior puts scores near 0.01: a threshold below it makes every anchor a candidate
    res = export_detector(model, tmp_path / "nas.onnx", ExportConfig(image_size=64, nms="batch", conf=0.005, max_det=20))
    assert res.detections_match and res.num_detections > 0
    assert before[1].shape == (1, 84, 4)


def test_onnxruntime_int8_uses_integer_kernels(tiny, tmp_path):
    from detectkit.export.deploy import onnx_op_counts
    from detectkit.export.ort_int8 import quantize_for_onnxruntime

    fp32 = export_detector(tiny, tmp_path / "fp32.onnx", ExportConfig(image_size=64)).path
    calib = [torch.rand(1, 3, 64, 64).numpy() for _ in range(4)]
    q = quantize_for_onnxruntime(fp32, tmp_path / "int8.onnx", calib)
    assert onnx_op_counts(q).get("QuantizeLinear", 0) > 5
    x = calib[0]
    boxes, scores = run_onnx(q, x)
    ref_boxes, ref_scores = run_onnx(fp32, x)
    assert np.abs(scores - ref_scores).max() < 0.1 and np.abs(boxes - ref_boxes).mean() < 2.0


def test_verify_compares_raw_outputs_and_refuses_to_compare_nothing(tiny, tmp_path):
    """An NMS graph is checked before NMS too (raw taps), so a sample with no detections still
    proves something; a graph without taps and no detections on either side is an error."""
    from detectkit.export.deploy import ExportCheckError, verify_onnx
    from detectkit.export.nms import DetectorWithNMS, NMSPostprocess

    cfg = ExportConfig(image_size=64, nms="batch", conf=0.999)
    res = export_detector(tiny, tmp_path / "nms.onnx", cfg)
    assert res.raw_compared and res.max_abs_error < 1e-4 and res.num_detections == 0
    assert [o.name for o in onnx.load(res.path).graph.output] == ["num_predictions", "pred_boxes", "pred_scores",
                                                                 "pred_classes"]  # taps are not shipped
    # a graph exported elsewhere, without the taps: zero detections on both sides compares nothing
    def bare(config: ExportConfig, name: str):
        module = DetectorWithNMS(tiny, NMSPostprocess.from_config(config.postprocess, "batch")).eval()
        torch.onnx.export(module, (torch.rand(1, 3, 64, 64),), str(tmp_path / name), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["num_predictions", "pred_boxes", "pred_scores",
                                                                "pred_classes"], dynamic_axes={"images": {0: "batch"}})
        return tmp_path / name

    with pytest.raises(ExportCheckError, match="compared nothing"):
        verify_onnx(tiny, bare(cfg, "bare.onnx"), cfg, torch.rand(2, 3, 64, 64))
    # with detections on the sample, the detections are compared and pass
    low = ExportConfig(image_size=64, nms="batch", conf=0.05)
    checked = verify_onnx(tiny, bare(low, "low.onnx"), low, torch.rand(2, 3, 64, 64), ExportResult("", "", (), "", []))
    assert checked.detections_match and checked.num_detections > 0 and not checked.raw_compared
    # and a graph that differs from the model before NMS is caught on the raw outputs
    other = TinyDetector(num_classes=3).eval().fuse()
    with pytest.raises(ExportCheckError, match="before NMS"):
        verify_onnx(other, res.path, cfg, torch.rand(2, 3, 64, 64))


def test_export_size_defaults_to_the_model_inference(tiny, tmp_path):
    import copy

    from detectkit.models.base import InferenceDefaults

    model = copy.deepcopy(tiny)
    model.inference = InferenceDefaults(image_size=(96, 96), longest=None)
    res = export_detector(model, tmp_path / "m.onnx")
    assert res.input_shape == (1, 3, 96, 96)
