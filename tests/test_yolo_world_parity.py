"""YOLO-World v2 against ultralytics' WorldModel (shared fixture, random init, no CLIP)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detectkit import create_model
from detectkit.models.yolo_world import YoloWorld
from detectkit.models.yolo_world.weights import load_ultralytics_state_dict
from detectkit.ops.boxes import xyxy_to_cxcywh

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE = SHARED / "fixtures" / "yolo_world_s_parity"
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"shared test data absent: {FIXTURE}")


def stress_transform(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """README §6: power-of-two rescalings that make the text path and the DFL decode matter."""
    out = {}
    for key, value in state.items():
        value = value.clone()
        if key.endswith("running_var"):
            value *= 0.25
        if ".attn.gl." in key:
            value *= 64
        if key in {f"model.22.cv4.{i}.bias" for i in range(3)}:
            value.fill_(0.0)
        if key in {f"model.22.cv4.{i}.logit_scale" for i in range(3)}:
            value.fill_(1.0)
        if key in {f"model.22.cv2.{i}.2.weight" for i in range(3)}:
            value *= 16
        out[key] = value
    return out


def float_sum(state: dict[str, torch.Tensor]) -> float:
    return sum(v.double().sum().item() for v in state.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / "state_dict.pt", weights_only=True)


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / "io.pt", weights_only=True)


def build(state: dict[str, torch.Tensor], txt: torch.Tensor) -> YoloWorld:
    model = create_model("yolo_world_v2_s", num_classes=80)
    load_ultralytics_state_dict(model, state)
    return model.set_text_embeddings(txt[0]).eval()


def run(model: YoloWorld, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One eval forward; backbone and layer-12 outputs captured with hooks."""
    captured = {}
    hooks = [
        model.backbone.register_forward_hook(lambda m, i, o: captured.update(backbone=o)),
        model.neck.top_down_p4.register_forward_hook(lambda m, i, o: captured.update(layer12=o)),
    ]
    try:
        with torch.no_grad():
            head = model.head_forward(x)
            boxes, scores = model.decode(head)
    finally:
        for hook in hooks:
            hook.remove()
    return {
        "cls_logits": head.cls_logits.transpose(1, 2),
        "boxes_dist": head.reg_distri.transpose(1, 2),
        "xywh": xyxy_to_cxcywh(boxes).transpose(1, 2),
        "scores": scores.transpose(1, 2),
        "backbone": captured["backbone"],
        "layer12": captured["layer12"],
        "neck": head.feats,
        "anchors": head.anchor_points,
        "strides": head.stride_tensor,
    }


@pytest.fixture(scope="module")
def primary(state, io) -> dict[str, torch.Tensor]:
    return run(build(state, io["txt_feats"]), io["x"])


@pytest.fixture(scope="module")
def stress_model(state, io) -> YoloWorld:
    stressed = stress_transform(state)
    assert float_sum(state) == pytest.approx(24578.769206972076, abs=1e-6)
    assert float_sum(stressed) == pytest.approx(15347.481802467797, abs=1e-6)
    return build(stressed, io["txt_feats"])


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def test_parameter_counts() -> None:
    # ultralytics also counts its frozen DFL projection conv (arange(16), 16 values) as a
    # parameter; detectkit keeps it as a non-persistent buffer of the shared DFL.
    expected = {"s": 12_759_880, "m": 28_376_158, "l": 46_832_050, "x": 72_886_377}
    for variant, count in expected.items():
        model = create_model(f"yolo_world_v2_{variant}", num_classes=80)
        assert sum(p.numel() for p in model.parameters()) + 16 == count, variant
        assert model.default_loss == "v8"


def test_batchnorm_settings() -> None:
    model = create_model("yolo_world_v2_s")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 64
    assert all(m.eps == 1e-3 and m.momentum == 0.03 for m in norms)


def test_primary_outputs(primary, io) -> None:
    close(primary["cls_logits"], io["cls_logits"], 1e-5)
    close(primary["boxes_dist"], io["boxes_dist"], 2e-5)
    close(primary["xywh"], io["y"][:, :4], 5e-4)
    torch.testing.assert_close(primary["scores"], io["y"][:, 4:], rtol=1e-4, atol=1e-9)
    close(primary["anchors"], (io["anchors"] * io["strides"]).T, 0)
    close(primary["strides"], io["strides"].T, 0)


def test_primary_features(primary, io) -> None:
    names = ("backbone_P3_layer4", "backbone_P4_layer6", "backbone_P5_sppf_layer9")
    for name, feat in zip(names, primary["backbone"]):
        close(feat, io[name], 1e-6)
    for name, feat in zip(("neck_P3_layer15", "neck_P4_layer18", "neck_P5_layer21"), primary["neck"]):
        close(feat, io[name], 1e-6)
    close(primary["layer12"], io["neck_layer12"], 1e-6)


@pytest.fixture(scope="module")
def stress_ref() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / "io_stress.pt", weights_only=True)


@pytest.fixture(scope="module")
def stress(stress_model, io) -> dict[str, torch.Tensor]:
    return run(stress_model, io["x"])


def test_stress_outputs(stress, stress_ref) -> None:
    close(stress["cls_logits"], stress_ref["cls_logits"], 1e-5)
    close(stress["boxes_dist"], stress_ref["boxes_dist"], 2e-5)
    close(stress["xywh"], stress_ref["y"][:, :4], 1e-3)
    close(stress["scores"], stress_ref["y"][:, 4:], 1e-5)
    for name, feat in zip(("neck_P3_layer15", "neck_P4_layer18", "neck_P5_layer21"), stress["neck"]):
        close(feat, stress_ref[name], 1e-5)


def test_stress_fused(stress_model, io, stress_ref) -> None:
    import copy

    fused = copy.deepcopy(stress_model).fuse()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.backbone.modules())
    out = run(fused, io["x"])
    close(out["cls_logits"], stress_ref["cls_logits"], 1e-5)
    close(out["xywh"], stress_ref["y"][:, :4], 1e-3)
