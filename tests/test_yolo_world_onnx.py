"""YOLO-World ONNX: vocabulary baked in, and text embeddings as a runtime input (dynamic K)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detectkit import create_model
from detectkit.export.onnx import run_onnx_session
from detectkit.models.yolo_world import YoloWorld

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def unit(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def model() -> YoloWorld:
    """Random weights scaled (like the parity fixture's stress variant) so text and boxes matter."""
    torch.manual_seed(0)
    net = create_model("yolo_world_v2_s")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.125, 0.375)
        for layer in net.neck.attn_layers():
            layer.attn.gl.weight.mul_(64)
        for head in net.head.cv4:
            head.bias.zero_()
            head.logit_scale.fill_(1.0)
        for branch in net.head.cv2:
            branch[-1].weight.mul_(16)
    return net.set_text_embeddings(unit(4, 1), ["a", "b", "c", "d"]).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(3))


def test_baked_vocabulary_onnx(model, images, tmp_path) -> None:
    from detectkit.export.deploy import ExportConfig
    from detectkit.export.world import export_baked

    path = tmp_path / "world_baked.onnx"
    result = export_baked(model, path, ExportConfig(image_size=(160, 160)), sample=images)
    assert result.max_abs_error is not None and result.max_abs_error < 1e-4
    assert model.reparameterized is False  # the caller's model keeps its text path
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == ["images"]
    boxes, scores = run_onnx_session(path, {"images": images})
    with torch.no_grad():
        ref_boxes, ref_scores = model(images)  # the prompt path, not the baked copy
    assert ref_scores.max() > 0.05  # scores are not all ~0 (the check would be vacuous)
    torch.testing.assert_close(torch.from_numpy(scores), ref_scores, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(boxes), ref_boxes, rtol=0, atol=2e-3)


def test_runtime_text_onnx_with_other_vocabulary_sizes(model, images, tmp_path) -> None:
    from detectkit.export.world import export_runtime_text

    path = tmp_path / "world_text.onnx"
    result = export_runtime_text(model, path, image_size=160, num_prompts=5)
    assert result["max_abs_error_scores"] < 1e-4 and result["max_abs_error_boxes"] < 2e-3
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == ["images", "text_embeddings"]
    assert graph.graph.input[1].type.tensor_type.shape.dim[0].dim_param == "num_prompts"
    for k, seed in ((3, 11), (9, 12)):
        text = unit(k, seed)
        boxes, scores = run_onnx_session(path, {"images": images[:1], "text_embeddings": text})
        with torch.no_grad():
            ref_boxes, ref_scores = model(images[:1], text=text)
        assert scores.shape == (1, 525, k)
        torch.testing.assert_close(torch.from_numpy(scores), ref_scores, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(boxes), ref_boxes, rtol=0, atol=2e-3)
