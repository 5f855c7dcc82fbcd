"""YOLO-NAS-S against super-gradients 3.7.1 (fixtures/yolo_nas_s_parity, random weights).

Tolerances are the ones the fixture README recommends for a CPU fp32 port.
"""

from __future__ import annotations

import copy
import hashlib
import warnings

import pytest
import torch
from torch.testing import assert_close

from detectkit import create_model
from detectkit.models.yolo_nas import YoloNAS
from detectkit.nn.qarepvgg import QARepVGGBlock
from detectkit.ops import postprocess

FEATURES = ["c2", "c3", "c4", "c5", "p3", "p4", "p5"]


@pytest.fixture(scope="module")
def fixture_dir(shared_dir):
    d = shared_dir / "fixtures" / "yolo_nas_s_parity"
    if not d.is_dir():
        pytest.skip(f"shared test data absent: {d}")
    return d


@pytest.fixture(scope="module")
def io(fixture_dir):
    return torch.load(fixture_dir / "io.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model(fixture_dir) -> YoloNAS:
    return create_model("yolo_nas_s", checkpoint=fixture_dir / "yolo_nas_s_random.pth").eval()


@pytest.fixture(scope="module")
def outputs(model, io):
    x = io["input"]
    with torch.no_grad():
        feats = model.forward_features(x)
        boxes, scores = model(x)  # the eval-mode Detector contract
        head = model.head_forward(x)
    return {"feats": feats, "boxes": boxes, "scores": scores, "head": head}


def _run_fused(model, x, full):
    fused = copy.deepcopy(model).fuse(full=full)
    with torch.no_grad():
        head = fused.head_forward(x)
        boxes, scores = fused.decode(head)
    return fused, head, boxes, scores


@pytest.fixture(scope="module")
def fused_partial(model, io):
    return _run_fused(model, io["input"], full=False)


@pytest.fixture(scope="module")
def fused_full(model, io):
    return _run_fused(model, io["input"], full=True)


@pytest.mark.parametrize("name", FEATURES)
def test_features_match_super_gradients(outputs, io, name):
    assert_close(outputs["feats"][name], io[f"feat_{name}"], atol=1e-4, rtol=1e-4)


def test_head_outputs_match_super_gradients(outputs, io):
    head = outputs["head"]
    assert head.bins == 17
    assert_close(head.cls_logits, io["cls_logits"], atol=5e-5, rtol=1e-5)
    assert_close(head.reg_distri, io["reg_distri"], atol=1e-5, rtol=1e-5)
    assert_close(outputs["scores"], io["pred_scores"], atol=1e-6, rtol=1e-5)
    assert_close(outputs["boxes"], io["pred_bboxes"], atol=1e-3, rtol=1e-5)
    # neck outputs travel with the head output (distillation)
    for f, name in zip(head.feats, ("p3", "p4", "p5")):
        assert_close(f, io[f"feat_{name}"], atol=1e-4, rtol=1e-4)


def test_anchors_exact(outputs, io):
    head = outputs["head"]
    assert torch.equal(head.anchor_points, io["anchor_points"])
    assert torch.equal(head.stride_tensor, io["stride_tensor"])
    counts = [f.shape[2] * f.shape[3] for f in head.feats]
    assert counts == io["num_anchors_list"].tolist() == [1600, 400, 100]


@pytest.mark.parametrize("mode", ["partial", "full"])
def test_fused_matches_super_gradients_fusion(mode, fused_partial, fused_full, io):
    fused, head, boxes, scores = fused_partial if mode == "partial" else fused_full
    p = f"fused_{mode}_"
    assert_close(head.cls_logits, io[p + "cls_logits"], atol=5e-5, rtol=1e-5)
    assert_close(head.reg_distri, io[p + "reg_distri"], atol=1e-5, rtol=1e-5)
    assert_close(scores, io[p + "pred_scores"], atol=1e-6, rtol=1e-5)
    assert_close(boxes, io[p + "pred_bboxes"], atol=1e-3, rtol=1e-5)


def test_fused_equals_unfused_within_noise(outputs, fused_partial, fused_full):
    for _, head, boxes, scores in (fused_partial, fused_full):
        assert_close(head.cls_logits, outputs["head"].cls_logits, atol=1e-5, rtol=0)
        assert_close(head.reg_distri, outputs["head"].reg_distri, atol=1e-6, rtol=0)
        assert_close(boxes, outputs["boxes"], atol=5e-4, rtol=0)
        assert_close(scores, outputs["scores"], atol=1e-7, rtol=0)


def test_fusion_structure(model, fused_partial, fused_full):
    blocks = [m for m in model.modules() if isinstance(m, QARepVGGBlock)]
    # stem 1 + stage downsamples 4 + stage bottlenecks 2*(2+3+5+2) + up-stage bottlenecks 2*(2+2)
    assert len(blocks) == 37 and all(b.rbr_reparam is None for b in blocks)  # no stale placeholder
    partial = fused_partial[0]
    pb = [m for m in partial.modules() if isinstance(m, QARepVGGBlock)]
    assert all(b.fusion == "partial" and isinstance(b.post_bn, torch.nn.BatchNorm2d) for b in pb)
    assert not any(".branch_" in k for k in partial.state_dict())
    full = fused_full[0]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in full.modules())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(model) == 12_878_304 and n(full) < n(partial) < n(model)


def test_partial_fusion_stays_trainable(fused_partial, io):
    fused = copy.deepcopy(fused_partial[0]).train()
    out = fused(io["input"][:1, :, :64, :64])
    (out.cls_logits.sum() + out.reg_distri.sum()).backward()
    grad = fused.backbone.stem.conv.rbr_reparam.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_traced_fused_model_equals_eager(fused_full, io):
    fused = fused_full[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # traced at a small size: anchors must follow the input shape, not be baked in
        traced = torch.jit.trace(fused, torch.rand(1, 3, 64, 64), check_trace=False)
    with torch.no_grad():
        boxes, scores = traced(io["input"])
    assert boxes.shape == (2, 2100, 4)
    assert_close(boxes, fused_full[2], atol=1e-4, rtol=0)
    assert_close(scores, fused_full[3], atol=1e-6, rtol=0)


def test_train_mode_any_size_batch_one():
    """Batch 1 in train mode (BN on batch statistics) at sides that are multiples of 32 but not of 64."""
    torch.manual_seed(0)
    model = create_model("yolo_nas_s", num_classes=3).train()
    for h, w in [(192, 192), (320, 160), (160, 160)]:
        with torch.set_grad_enabled((h, w) == (160, 160)):
            out = model(torch.rand(1, 3, h, w))
        a = sum((h // s) * (w // s) for s in (8, 16, 32))
        assert out.cls_logits.shape == (1, a, 3) and out.reg_distri.shape == (1, a, 68)
        assert out.anchor_points.shape == (a, 2) and out.stride_tensor.shape == (a, 1)
        assert [tuple(f.shape[2:]) for f in out.feats] == [(h // s, w // s) for s in (8, 16, 32)]
    (out.cls_logits.sigmoid().mean() + out.reg_distri.mean()).backward()
    assert model.heads.head1.cls_pred.weight.grad.abs().sum() > 0
    assert model.backbone.stage1.blocks.bottlenecks[0].alpha.grad is not None
    assert model.backbone.stem.conv.branch_1x1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- stress variant

STRESS_FACTORS = [(144.0, 256.0), (352.0, 1024.0), (384.0, 512.0)]


def _sha256(sd) -> str:
    h = hashlib.sha256()
    for t in sd.values():
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _float64_sum(sd) -> float:
    return sum(t.double().sum().item() for t in sd.values() if t.is_floating_point())


@pytest.fixture(scope="module")
def stress(fixture_dir):
    ref = torch.load(fixture_dir / "io_stress.pt", map_location="cpu", weights_only=True)
    sd = torch.load(fixture_dir / "yolo_nas_s_random.pth", map_location="cpu", weights_only=True)["net"]
    assert _sha256(sd) == "4e28b5d483fbdae29529cfac3ba7a5dcc26a0deecb8d120af152feb75bb9e49b"
    for k in sd:
        if k.endswith(".running_mean"):
            sd[k] = sd[k] * 0.0625
    for h, (kc, kr) in enumerate(STRESS_FACTORS, start=1):
        sd[f"heads.head{h}.cls_pred.weight"] = sd[f"heads.head{h}.cls_pred.weight"] * kc
        sd[f"heads.head{h}.reg_pred.weight"] = sd[f"heads.head{h}.reg_pred.weight"] * kr
        sd[f"heads.head{h}.reg_pred.bias"] = sd[f"heads.head{h}.reg_pred.bias"] * 8.0
    assert _sha256(sd) == bytes(ref["state_dict_sha256"].tolist()).hex()
    assert _float64_sum(sd) == pytest.approx(float(ref["state_dict_float64_sum"]), rel=1e-12)
    for k, s in ref["transform_checksums"].items():
        assert sd[k].double().sum().item() == pytest.approx(float(s), rel=1e-9, abs=1e-9), k
    model = create_model("yolo_nas_s", checkpoint={"net": sd}).eval()
    return model, ref


@pytest.fixture(scope="module")
def stress_outputs(stress, io):
    model, _ = stress
    x = io["input"]
    with torch.no_grad():
        head = model.head_forward(x)
        boxes, scores = model(x)
    return head, boxes, scores


def test_stress_outputs_match(stress, stress_outputs):
    _, ref = stress
    head, boxes, scores = stress_outputs
    assert_close(boxes, ref["pred_bboxes"], atol=5e-3, rtol=0)
    assert_close(scores, ref["pred_scores"], atol=1e-5, rtol=0)
    assert_close(head.cls_logits, ref["cls_logits"], atol=1e-4, rtol=0)
    assert_close(head.reg_distri, ref["reg_distri"], atol=1e-4, rtol=0)
    for f, name in zip(head.feats, ("p3", "p4", "p5")):
        assert_close(f, ref[f"feat_{name}"], atol=5e-6, rtol=0)
    assert (scores > 0.25).sum(dim=(1, 2)).tolist() == ref["num_candidates"].tolist()


@pytest.mark.parametrize(
    "key, kwargs",
    [
        ("detections", {}),
        ("detections_top100", {"top_k": 100}),
        ("detections_single_label", {"multi_label": False}),
    ],
)
def test_stress_detections_match(stress, stress_outputs, key, kwargs):
    _, ref = stress
    _, boxes, scores = stress_outputs
    args = {"conf": 0.25, "iou": 0.7, "top_k": 1000, "max_det": 300, "multi_label": True, "agnostic": False}
    dets = postprocess(boxes, scores, **{**args, **kwargs})
    assert len(dets) == len(ref[key]) == 2
    for got, want in zip(dets, ref[key]):
        assert got.shape == want.shape, (got.shape, want.shape)
        assert torch.equal(got[:, 5], want[:, 5])  # class column, row by row
        assert_close(got[:, :4], want[:, :4], atol=5e-3, rtol=0)
        assert_close(got[:, 4], want[:, 4], atol=1e-5, rtol=0)


def test_stress_fused_detections_identical(stress, io):
    model, ref = stress
    fused = copy.deepcopy(model).fuse(full=True)
    with torch.no_grad():
        boxes, scores = fused(io["input"])
    dets = postprocess(boxes, scores, conf=0.25, iou=0.7, top_k=1000, max_det=300)
    for got, want in zip(dets, ref["detections"]):
        assert got.shape == want.shape
        assert torch.equal(got[:, 5], want[:, 5])
        assert_close(got[:, :4], want[:, :4], atol=5e-3, rtol=0)
        assert_close(got[:, 4], want[:, 4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("residual, stride, use_alpha", [(True, 1, True), (True, 1, False), (False, 2, False)])
def test_qarepvgg_block_fusion_is_exact(residual, stride, use_alpha):
    """Branch merge and post_bn folding reproduce the three-branch block (non-trivial BN stats, alpha)."""
    torch.manual_seed(0)
    cout = 8 if residual else 6
    block = QARepVGGBlock(8, cout, stride=stride, use_residual_connection=residual, use_alpha=use_alpha)
    for bn in (block.branch_3x3.bn, block.post_bn):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
        torch.nn.init.normal_(bn.bias)
    if use_alpha:
        torch.nn.init.constant_(block.alpha, 0.7)
    block.eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        ref = block(x)
        block.partial_fusion()
        partial = block(x)
        block.full_fusion()
        full = block(x)
    assert ref.shape == (2, cout, 9 // stride + (9 % stride > 0), 9 // stride + (9 % stride > 0))
    assert_close(partial, ref, atol=1e-5, rtol=1e-5)
    assert_close(full, ref, atol=1e-5, rtol=1e-5)
    assert [n for n, _ in block.named_parameters()] == ["rbr_reparam.weight", "rbr_reparam.bias"]
