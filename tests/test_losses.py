"""Loss parity against the super-gradients and ultralytics fixtures, plus hand-checked terms.

The fixtures hold the reference's raw head outputs, targets, assigner outputs, loss values and
gradients (see the READMEs under shared/fixtures/yolo_nas_s_parity and yolo_world_s_parity).
Tolerances are the READMEs' recommended ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from detectkit.losses import PPYoloELoss, V8DetectionLoss, build_loss, pad_targets
from detectkit.losses.components import dfl_loss, dfl_targets, iou_loss, varifocal_loss
from detectkit.models.outputs import HeadOutput
from detectkit.ops.boxes import cxcywh_to_xyxy, make_anchors, paired_iou

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
NAS = SHARED / "fixtures" / "yolo_nas_s_parity"
WORLD = SHARED / "fixtures" / "yolo_world_s_parity"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared test data absent: {SHARED}")
FILES = ["loss.pt", "loss_stress.pt", "loss_synthetic.pt"]


def close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------ super-gradients PPYoloELoss
def nas_case(name):
    d = torch.load(NAS / name, weights_only=True)
    cls = d["cls_logits"].clone().requires_grad_(True)
    reg = d["reg_distri"].clone().requires_grad_(True)
    head = HeadOutput(cls, reg, d["anchor_points"], d["stride_tensor"], bins=17)
    t = d["targets"]  # (image, class, cx, cy, w, h) px -> our (image, class, x1, y1, x2, y2)
    x1y1 = t[:, 2:4] - 0.5 * t[:, 4:6]  # as SG builds its boxes
    targets = torch.cat([t[:, :2], x1y1, x1y1 + t[:, 4:6]], dim=1)
    return d, head, targets


@needs_shared
@pytest.mark.parametrize("name", FILES)
def test_ppyoloe_parity(name):
    d, head, targets = nas_case(name)
    loss = PPYoloELoss(num_classes=80)
    total, comp = loss(head, targets, batch_size=2)
    total.backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    close(total, d["loss"], **tol)
    close(comp["cls"], d["loss_cls"], **tol)
    close(comp["box"], d["loss_iou"], **tol)
    close(comp["dfl"], d["loss_dfl"], **tol)
    close(comp["normalizer"], d["assigned_scores_sum"].clamp(min=1), **tol)
    # un-normalised sums = weighted terms * normaliser / weight
    close(comp["cls"] * comp["normalizer"] / 1.0, d["cls_loss_sum"], **tol)
    close(comp["box"] * comp["normalizer"] / 2.5, d["iou_loss_sum"], **tol)
    close(comp["dfl"] * comp["normalizer"] / 0.5, d["dfl_loss_sum"], **tol)
    assert int(comp["num_fg"]) == int(d["fg_mask"].sum())
    close(comp["image_losses"].sum(), total.detach(), rtol=1e-6, atol=1e-6)
    close(head.cls_logits.grad, d["grad_cls_logits"], rtol=1e-4, atol=1e-6)
    close(head.reg_distri.grad, d["grad_reg_distri"], rtol=1e-4, atol=2e-7)

    asg = loss.assign(head, targets)
    fg = d["fg_mask"]
    assert torch.equal(asg.labels, d["assigned_labels"])
    assert torch.equal(asg.fg_mask, fg)
    close(asg.scores, d["assigned_scores"], rtol=0, atol=2e-5)
    close(asg.bboxes[fg], d["assigned_bboxes"][fg], rtol=0, atol=1e-5)
    stride = d["stride_tensor"]
    ltrb = dfl_targets((d["anchor_points"] / stride).expand(2, -1, -1), asg.bboxes / stride, bins=17)
    close(ltrb[fg], d["dfl_target_ltrb"][fg], rtol=0, atol=1e-5)


@needs_shared
def test_ppyoloe_padding_matches_reference():
    d, _, targets = nas_case("loss.pt")
    labels, boxes, mask = pad_targets(targets, 2)
    assert torch.equal(mask, d["pad_gt_mask"].squeeze(-1))
    assert torch.equal(labels[mask], d["gt_class"].squeeze(-1)[mask])
    assert torch.equal(boxes, d["gt_bbox"])


# ------------------------------------------------------------------ ultralytics v8DetectionLoss
def world_case(name):
    d = torch.load(WORLD / name, weights_only=True)
    # ultralytics heads are [B, C, A] / [B, 64, A] with anchors in grid units: to our contract
    cls = d["scores"].permute(0, 2, 1).contiguous().requires_grad_(True)
    reg = d["boxes"].permute(0, 2, 1).contiguous().requires_grad_(True)
    stride = d["stride_tensor"]
    head = HeadOutput(cls, reg, d["anchor_points"] * stride, stride, bins=16)
    xyxy = cxcywh_to_xyxy(d["bboxes"] * 320.0)  # normalised cxcywh -> px xyxy (320x320 input)
    targets = torch.cat([d["batch_idx"][:, None], d["cls"], xyxy], dim=1)
    return d, head, targets


@needs_shared
@pytest.mark.parametrize("name", FILES)
def test_v8_parity(name):
    d, head, targets = world_case(name)
    loss = V8DetectionLoss(num_classes=5)
    total, comp = loss(head, targets, batch_size=2)
    total.backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    close(total, d["total"], **tol)
    items = torch.stack([comp["box"], comp["cls"], comp["dfl"]])
    close(items, d["loss_items"], **tol)
    close(items * 2, d["loss_vec"], **tol)
    close(comp["normalizer"], d["target_scores_sum"], **tol)
    close(comp["image_losses"].sum(), total.detach(), rtol=1e-6, atol=1e-4)
    grad_scores = head.cls_logits.grad.permute(0, 2, 1)
    grad_boxes = head.reg_distri.grad.permute(0, 2, 1)
    close(grad_scores, d["grad_scores"], rtol=1e-4, atol=1e-6)
    close(grad_boxes, d["grad_boxes"], rtol=1e-4, atol=1e-6)

    asg = loss.assign(head, targets)
    ref_fg = d["fg_mask"]
    if name == "loss_stress.pt":
        # README 8.6 caveat: the tiny GT 3 has metric 0 on all its candidates (a top-k tie);
        # which zero-weight anchors become foreground is implementation-defined.
        weighted = asg.scores.sum(-1) > 0
        assert torch.equal(asg.fg_mask & weighted, ref_fg & (d["target_scores"].sum(-1) > 0))
        tied = torch.zeros_like(ref_fg)
        tied[1, [534, 535, 574, 575, 1747]] = True
        assert torch.equal(asg.fg_mask & ~tied, ref_fg & ~tied)
        fg = asg.fg_mask & ref_fg
    else:
        assert torch.equal(asg.fg_mask, ref_fg)
        fg = ref_fg
    assert torch.equal(asg.gt_idx[fg], d["target_gt_idx"][fg])
    assert torch.equal(asg.labels[fg], d["target_labels"][fg])
    close(asg.scores, d["target_scores"], rtol=0, atol=2e-5)
    close(asg.bboxes[fg], d["target_bboxes"][fg], rtol=0, atol=1e-4)
    stride = d["stride_tensor"]
    ltrb = dfl_targets(d["anchor_points"].expand(2, -1, -1), asg.bboxes / stride, bins=16)
    close(ltrb[fg], d["target_ltrb"][fg], rtol=0, atol=1e-4)


@needs_shared
def test_v8_tiny_gt_enlargement_and_positive_counts():
    d, head, targets = world_case("loss_synthetic.pt")
    asg = V8DetectionLoss(num_classes=5).assign(head, targets)
    # README 8.2: the 6x6 tiny GT (row 0 of image 1) is widened to 16x16 for the centre prior
    tiny = torch.nonzero(asg.fg_mask[1] & (asg.gt_idx[1] == 0)).flatten().tolist()
    assert tiny == [534, 535, 574, 575, 1747]
    assert asg.fg_mask.sum(1).tolist() == [30, 45]


# ------------------------------------------------------------------ behaviour of the composed losses
def random_head(batch=2, classes=4, bins=16, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(size // s, size // s) for s in (8, 16, 32)]
    points, strides = make_anchors(shapes, (8, 16, 32))
    a = points.shape[0]
    cls = (torch.randn(batch, a, classes, generator=g) - 2).requires_grad_(True)
    reg = torch.randn(batch, a, 4 * bins, generator=g).requires_grad_(True)
    return HeadOutput(cls, reg, points, strides, bins)


TARGETS = torch.tensor(
    [
        [1, 2, 30.0, 6.0, 60.0, 40.0],
        [0, 1, 2.0, 3.0, 30.0, 34.0],
        [1, 0, 10.0, 10.0, 26.0, 50.0],
        [0, 3, 33.0, 30.0, 63.0, 62.0],
    ]
)


@pytest.mark.parametrize("name", ["ppyoloe", "v8"])
def test_row_order_does_not_matter(name):
    head = random_head(bins=17 if name == "ppyoloe" else 16)
    loss = build_loss(name, 4)
    a, _ = loss(head, TARGETS, 2)
    b, _ = loss(head, TARGETS[[3, 0, 2, 1]], 2)
    assert a.item() > 0
    torch.testing.assert_close(a, b)


def test_v8_scale_by_batch_and_image_losses():
    head = random_head()
    scaled, comp = V8DetectionLoss(4)(head, TARGETS, 2)
    plain, comp2 = V8DetectionLoss(4, scale_by_batch=False)(head, TARGETS, 2)
    torch.testing.assert_close(scaled, 2 * plain)
    torch.testing.assert_close(comp["cls"], comp2["cls"])  # logged items are never scaled
    torch.testing.assert_close(comp2["image_losses"].sum(), plain.detach())
    assert comp2["image_losses"].shape == (2,) and not comp2["image_losses"].requires_grad


def test_image_losses_are_each_images_share():
    head = random_head(bins=17)
    loss = PPYoloELoss(4)
    _, comp = loss(head, TARGETS, 2)
    # image 0 alone, normalised by the same number, gives its own share
    head0 = HeadOutput(head.cls_logits[:1], head.reg_distri[:1], head.anchor_points, head.stride_tensor, 17)
    t0 = TARGETS[TARGETS[:, 0] == 0]
    _, comp0 = loss(head0, t0, 1)
    share0 = comp0["image_losses"][0] * comp0["normalizer"] / comp["normalizer"]
    torch.testing.assert_close(comp["image_losses"][0], share0)


def test_class_mask():
    head = random_head(bins=17)
    loss = PPYoloELoss(4)
    full, comp = loss(head, TARGETS, 2)
    ones, comp1 = loss(head, TARGETS, 2, class_mask=torch.ones(2, 4, dtype=torch.bool))
    torch.testing.assert_close(full, ones)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 0] = False  # class 0 is not in image 0's vocabulary (no GT of class 0 there)
    masked, comp2 = loss(head, TARGETS, 2, class_mask=mask)
    p = head.cls_logits[0, :, 0].detach().sigmoid()
    removed = (0.75 * p.pow(2) * torch.nn.functional.softplus(head.cls_logits[0, :, 0].detach())).sum()
    torch.testing.assert_close(comp["cls"] - comp2["cls"], removed / comp["normalizer"])
    torch.testing.assert_close(comp["box"], comp2["box"])


def test_wrong_class_count_raises():
    head = random_head(classes=4, bins=17)
    with pytest.raises(ValueError, match="num_classes=80"):
        PPYoloELoss(80)(head, TARGETS, 2)
    with pytest.raises(ValueError, match="batch"):
        PPYoloELoss(4)(head, TARGETS, 3)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("yolox", 4)


@pytest.mark.parametrize("name", ["ppyoloe", "v8"])
def test_no_targets_at_all(name):
    head = random_head(bins=17 if name == "ppyoloe" else 16)
    total, comp = build_loss(name, 4)(head, torch.zeros(0, 6), 2)
    total.backward()
    assert torch.isfinite(total) and total > 0  # every anchor is a negative
    assert comp["box"] == 0 and comp["dfl"] == 0 and comp["num_fg"] == 0 and comp["normalizer"] == 1
    assert head.reg_distri.grad is not None and torch.count_nonzero(head.reg_distri.grad) == 0


def test_fp32_under_autocast():
    head = random_head(bins=17)
    ref, _ = PPYoloELoss(4)(head, TARGETS, 2)
    half = HeadOutput(
        head.cls_logits.detach().bfloat16(),
        head.reg_distri.detach().bfloat16(),
        head.anchor_points,
        head.stride_tensor,
        17,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = PPYoloELoss(4)(half, TARGETS, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.detach(), rtol=0.05, atol=0.05)


# ------------------------------------------------------------------ terms, by hand
def test_paired_iou_hand_values():
    a = torch.tensor([0.0, 0.0, 2.0, 2.0])
    b = torch.tensor([1.0, 1.0, 3.0, 3.0])
    iou = 1 / 7
    torch.testing.assert_close(paired_iou(a, b, "iou", 1e-9), torch.tensor(iou))
    torch.testing.assert_close(paired_iou(a, b, "giou", 1e-10), torch.tensor(iou - (9 - 7) / 9))
    # same aspect ratio: CIoU = IoU - centre distance^2 / enclosing diagonal^2 = 1/7 - 2/18
    torch.testing.assert_close(paired_iou(a, b, "ciou", 1e-7), torch.tensor(iou - 2 / 18))
    # padding rows: zero-area boxes give 0, not NaN
    z = torch.zeros(4)
    assert paired_iou(z, z, "iou", 1e-9) == 0
    # aspect term: 2x1 vs 1x2 boxes sharing a centre
    w, h = torch.tensor([0.0, 0.5, 2.0, 1.5]), torch.tensor([0.5, 0.0, 1.5, 2.0])
    v = 4 / math.pi**2 * (math.atan(0.5) - math.atan(2.0)) ** 2
    i = 1 / 3
    torch.testing.assert_close(paired_iou(w, h, "ciou", 0.0), torch.tensor(i - (0 + v * v / (v - i + 1))))


def test_dfl_terms_by_hand():
    bins = 4
    logits = torch.zeros(1, 4 * bins)  # uniform: CE = log(bins) for any bin
    targets = torch.tensor([[0.0, 1.0, 2.5, 2.99]])
    torch.testing.assert_close(dfl_loss(logits, targets, bins), torch.tensor([math.log(4)]))
    logits = torch.full((1, 4, bins), -1e4)
    logits[0, :, 1] = 0  # all mass on bin 1
    one = dfl_loss(logits.flatten(1), torch.ones(1, 4), bins)
    torch.testing.assert_close(one, torch.zeros(1))
    # clip to bins - 1 - 0.01 so that the right neighbour exists
    t = dfl_targets(torch.tensor([[5.0, 5.0]]), torch.tensor([[-20.0, 4.0, 6.5, 30.0]]), bins=17)
    torch.testing.assert_close(t, torch.tensor([[15.99, 1.0, 1.5, 15.99]]))


def test_varifocal_and_iou_loss_by_hand():
    logit = torch.tensor([0.0, 0.0])
    target = torch.tensor([0.0, 0.8])
    onehot = torch.tensor([0.0, 1.0])
    # negative: 0.75 * 0.5^2 * log 2 ; positive: 0.8 * BCE(0, 0.8) = 0.8 * log 2
    expected = torch.tensor([0.75 * 0.25 * math.log(2), 0.8 * math.log(2)])
    torch.testing.assert_close(varifocal_loss(logit, target, onehot), expected)
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    torch.testing.assert_close(iou_loss(box, box, "giou", 1e-10), torch.zeros(1), atol=1e-6, rtol=0)


def test_target_class_out_of_range_raises():
    head = random_head(bins=17)
    bad = TARGETS.clone()
    bad[0, 1] = 4
    with pytest.raises(ValueError, match="target classes"):
        PPYoloELoss(4)(head, bad, 2)


def test_normalizer_all_reduce_under_torch_distributed(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised by another test")
    head = random_head(bins=17)
    ref, comp = PPYoloELoss(4)(head, TARGETS, 2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        synced, comp_synced = PPYoloELoss(4, sync_normalizer=True)(head, TARGETS, 2)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(synced, ref)  # world size 1: the average over ranks is the local sum
    torch.testing.assert_close(comp_synced["normalizer"], comp["normalizer"])



def _rank_slice(rank: int) -> tuple[HeadOutput, torch.Tensor]:
    """Rank ``rank``'s image of the super-gradients fixture batch (assigned-score sums 7.6 and 15.2),
    its targets renumbered to image 0."""
    _, full, targets = nas_case("loss.pt")
    rows = slice(rank, rank + 1)
    head = HeadOutput(full.cls_logits.detach()[rows].clone().requires_grad_(True),
                      full.reg_distri.detach()[rows].clone().requires_grad_(True),
                      full.anchor_points, full.stride_tensor, full.bins)
    mine = targets[targets[:, 0] == rank].clone()
    mine[:, 0] = 0
    return head, mine


def _synced_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        head, targets = _rank_slice(rank)
        total, comp = PPYoloELoss(80, sync_normalizer=True)(head, targets, 1)
        total.backward()
    finally:
        dist.destroy_process_group()
    torch.save({"total": total.detach(), "normalizer": comp["normalizer"], "grad_cls": head.cls_logits.grad,
                "grad_reg": head.reg_distri.grad}, f"{out}.{rank}")


@needs_shared
def test_normalizer_all_reduce_over_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    """DDP on 2 ranks (gloo, CPU), one image each: each rank divides by the ranks' mean assigned-score
    sum, so the ranks' mean loss and their averaged gradients are one process's on the whole batch."""
    import torch.multiprocessing as mp

    out = tmp_path / "rank"
    mp.spawn(_synced_rank, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]

    _, whole, targets = nas_case("loss.pt")
    total, comp = PPYoloELoss(80)(whole, targets, 2)
    total.backward()
    assert ranks[0]["normalizer"] == ranks[1]["normalizer"]  # every rank divides by the same number
    torch.testing.assert_close(ranks[0]["normalizer"] * 2, comp["normalizer"])
    torch.testing.assert_close((ranks[0]["total"] + ranks[1]["total"]) / 2, total.detach())
    for key, grad in (("grad_cls", whole.cls_logits.grad), ("grad_reg", whole.reg_distri.grad)):
        averaged = torch.cat([ranks[0][key], ranks[1][key]]) / 2  # what DDP's gradient averaging yields
        torch.testing.assert_close(averaged, grad, rtol=1e-4, atol=1e-7)
    # without the all-reduce the ranks' normalisers differ (7.6 vs 15.2) and the mean loss would not match
    local = [PPYoloELoss(80)(*_rank_slice(r), 1) for r in range(2)]
    assert not torch.allclose((local[0][0] + local[1][0]).detach() / 2, total.detach(), rtol=1e-3)
