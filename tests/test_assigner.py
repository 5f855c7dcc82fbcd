"""Task-aligned assigner on cases small enough to check by hand, and chunked == unchunked."""

from __future__ import annotations

import pytest
import torch

from detectkit.losses import TaskAlignedAssigner
from detectkit.ops.boxes import make_anchors, paired_iou

EPS = 1e-9


def assign(assigner, scores, preds, points, labels, boxes, mask=None):
    """Batch-of-one convenience: lists -> tensors -> assignment."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    preds = torch.as_tensor(preds, dtype=torch.float32)
    points = torch.as_tensor(points, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(labels.shape[0], -1, 4)
    if mask is None:
        mask = torch.ones(labels.shape, dtype=torch.bool)
    return assigner(scores, preds, points, labels, boxes, torch.as_tensor(mask))


# Four anchors; one GT (0, 0, 40, 20) of class 1 contains anchors 0 and 1 only.
POINTS = [[10, 10], [30, 10], [10, 30], [50, 50]]
PREDS = [[[0, 0, 40, 20], [0, 0, 20, 20], [0, 0, 40, 20], [40, 40, 60, 60]]]  # IoU with GT: 1, 0.5, 0.5, 0
SCORES = [[[0.1, 0.5], [0.1, 0.5], [0.1, 0.5], [0.1, 0.5]]]
GT = [[[0, 0, 40, 20]]]


def test_top1_picks_the_best_aligned_candidate():
    a = assign(TaskAlignedAssigner(2, topk=1, alpha=1.0, beta=6.0), SCORES, PREDS, POINTS, [[1]], GT)
    assert a.fg_mask.tolist() == [[True, False, False, False]]
    assert a.labels.tolist() == [[1, 2, 2, 2]]  # background label = num_classes
    assert a.gt_idx.tolist() == [[0, 0, 0, 0]]
    # normalised metric = m / (max m + eps) * max IoU = 0.5 / (0.5 + 1e-9) * 1
    expected = torch.zeros(1, 4, 2)
    expected[0, 0, 1] = 0.5 / (0.5 + EPS)
    torch.testing.assert_close(a.scores, expected)
    torch.testing.assert_close(a.bboxes[0, 0], torch.tensor([0.0, 0, 40, 20]))


def test_topk_only_among_candidates():
    # anchor 2 has the same IoU as anchor 1 but its centre (10, 30) lies outside the GT
    a = assign(TaskAlignedAssigner(2, topk=3, alpha=1.0, beta=6.0), SCORES, PREDS, POINTS, [[1]], GT)
    assert a.fg_mask.tolist() == [[True, True, False, False]]
    m1 = 0.5 * 0.5**6
    torch.testing.assert_close(a.scores[0, :, 1], torch.tensor([0.5 / (0.5 + EPS), m1 / (0.5 + EPS), 0, 0]))
    assert a.scores[0, :, 0].abs().sum() == 0


def test_alpha_and_beta_change_the_ranking():
    # anchor 0: score 0.1, IoU 1 ; anchor 1: score 0.9, IoU 0.5. beta=6 prefers 0, beta=1 prefers 1.
    scores = [[[0.0, 0.1], [0.0, 0.9], [0.0, 0.0], [0.0, 0.0]]]
    strict = assign(TaskAlignedAssigner(2, topk=1, alpha=1.0, beta=6.0), scores, PREDS, POINTS, [[1]], GT)
    loose = assign(TaskAlignedAssigner(2, topk=1, alpha=1.0, beta=1.0), scores, PREDS, POINTS, [[1]], GT)
    assert strict.fg_mask[0].nonzero().flatten().tolist() == [0]
    assert loose.fg_mask[0].nonzero().flatten().tolist() == [1]


# Conflict: anchor 0 at (20, 20) lies inside GT A and GT B (each selects it) but not inside GT C;
# its prediction equals C exactly, so C has the largest IoU over all GT rows.
CONFLICT = dict(
    points=[[20, 20], [100, 100]],
    preds=[[[21, 21, 61, 61], [90, 90, 110, 110]]],
    scores=[[[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]],
    labels=[[0, 1, 2]],
    boxes=[[[0, 0, 40, 40], [8, 8, 48, 48], [21, 21, 61, 61]]],
)


def run_conflict(assigner, mask=None):
    c = CONFLICT
    return assign(assigner, c["scores"], c["preds"], c["points"], c["labels"], c["boxes"], mask)


def test_conflict_super_gradients_takes_max_iou_over_all_gts():
    a = run_conflict(TaskAlignedAssigner.ppyoloe(3, topk=1))
    # C never selected the anchor (not a candidate) but has IoU 1: SG gives it the anchor
    assert a.fg_mask.tolist() == [[True, False]]
    assert a.gt_idx[0, 0] == 2 and a.labels[0, 0] == 2
    torch.testing.assert_close(a.bboxes[0, 0], torch.tensor([21.0, 21, 61, 61]))
    torch.testing.assert_close(a.scores[0, 0], torch.tensor([0, 0, 0.5 / (0.5 + EPS)]))


def test_conflict_ultralytics_takes_max_ciou_over_candidates():
    a = run_conflict(TaskAlignedAssigner.ultralytics(3, topk=1))
    # only A and B are candidates for the anchor; B (IoU 0.295 vs 0.127) has the larger CIoU
    assert a.fg_mask.tolist() == [[True, False]]
    assert a.gt_idx[0, 0] == 1 and a.labels[0, 0] == 1
    pred = torch.tensor([21.0, 21, 61, 61])
    ciou_a = paired_iou(torch.tensor([0.0, 0, 40, 40]), pred, "ciou", 1e-7)
    ciou_b = paired_iou(torch.tensor([8.0, 8, 48, 48]), pred, "ciou", 1e-7)
    assert 0 < ciou_a < ciou_b
    # one positive: m / (m + eps) * CIoU
    m = 0.5**0.5 * ciou_b**6
    expected = torch.zeros(3)
    expected[1] = m / (m + EPS) * ciou_b
    torch.testing.assert_close(a.scores[0, 0], expected)


def test_padding_rows_are_ignored():
    ref = run_conflict(TaskAlignedAssigner.ppyoloe(3, topk=1), mask=[[True, True, False]])
    # without C, the SG conflict goes to B (IoU 0.295 > 0.127)
    assert ref.gt_idx[0, 0] == 1 and ref.fg_mask.tolist() == [[True, False]]
    # a padding row with a box that would win everything changes nothing
    c = CONFLICT
    boxes = [[[0, 0, 40, 40], [8, 8, 48, 48], [0, 0, 200, 200]]]
    padded = assign(
        TaskAlignedAssigner.ppyoloe(3, topk=1),
        c["scores"],
        c["preds"],
        c["points"],
        [[0, 1, 2]],
        boxes,
        [[True, True, False]],
    )
    for x, y in zip(ref, padded):
        assert torch.equal(x, y)


def test_tiny_box_candidates_with_and_without_enlargement():
    points, _ = make_anchors([(40, 40), (20, 20), (10, 10)], (8, 16, 32))
    a = points.shape[0]
    gt = torch.tensor([[[119.0, 111, 125, 117]]])  # 6x6: one stride-8 centre (124, 116) inside
    preds = gt.expand(1, a, 4).clone()
    scores = torch.full((1, a, 1), 0.5)
    labels, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    sg = TaskAlignedAssigner.ppyoloe(1)(scores, preds, points, labels, gt, mask)
    ul = TaskAlignedAssigner.ultralytics(1)(scores, preds, points, labels, gt, mask)
    assert sg.fg_mask[0].nonzero().flatten().tolist() == [575]
    # widened to 16x16 about (122, 114): stride-8 centres 116|124 x 108|116, and stride-16 (120, 120)
    assert ul.fg_mask[0].nonzero().flatten().tolist() == [534, 535, 574, 575, 1747]
    # a 10x10 box is not widened (ultralytics widens sides below the smallest stride only)
    gt10 = torch.tensor([[[117.0, 109, 127, 119]]])
    ul10 = TaskAlignedAssigner.ultralytics(1)(scores, gt10.expand(1, a, 4), points, labels, gt10, mask)
    assert ul10.fg_mask[0].nonzero().flatten().tolist() == [575]


def test_no_gts_at_all_and_one_empty_image():
    points = torch.tensor(POINTS, dtype=torch.float32)
    preds = torch.tensor(PREDS, dtype=torch.float32).expand(2, -1, -1)
    scores = torch.tensor(SCORES).expand(2, -1, -1)
    assigner = TaskAlignedAssigner(2, topk=1)
    empty = assigner(
        scores,
        preds,
        points,
        torch.zeros(2, 0, dtype=torch.long),
        torch.zeros(2, 0, 4),
        torch.zeros(2, 0, dtype=torch.bool),
    )
    assert empty.fg_mask.sum() == 0 and (empty.labels == 2).all() and empty.scores.sum() == 0
    # image 1 has only a padding row: it is all background, image 0 is unaffected
    labels = torch.tensor([[1], [0]])
    boxes = torch.tensor([[[0.0, 0, 40, 20]], [[0.0, 0, 0, 0]]])
    mask = torch.tensor([[True], [False]])
    both = assigner(scores, preds, points, labels, boxes, mask)
    single = assigner(scores[:1], preds[:1], points, labels[:1], boxes[:1], mask[:1])
    assert both.fg_mask[1].sum() == 0 and (both.labels[1] == 2).all() and both.scores[1].sum() == 0
    for x, y in zip(both, single):
        assert torch.equal(x[:1], y)


@pytest.mark.parametrize("preset", ["ppyoloe", "ultralytics"])
def test_chunked_equals_unchunked_with_300_gts(preset):
    g = torch.Generator().manual_seed(0)
    points, strides = make_anchors([(32, 32), (16, 16), (8, 8)], (8, 16, 32))
    a, c, n = points.shape[0], 6, 300
    centres = torch.rand(2, n, 2, generator=g) * 256
    sizes = torch.rand(2, n, 2, generator=g) * 60 + 3
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], -1).clamp(0, 256)
    labels = torch.randint(0, c, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 120:] = False  # image 1 has 120 GTs, the rest is padding
    boxes[1, 120:] = 0
    ltrb = (torch.rand(2, a, 4, generator=g) * 4 + 0.3) * strides
    preds = torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)
    scores = torch.rand(2, a, c, generator=g)
    make = getattr(TaskAlignedAssigner, preset)
    whole = make(c)(scores, preds, points, labels, boxes, mask)
    assert whole.fg_mask.sum() > 400  # a crowded case, with conflicts
    for budget in (n * a, 37 * a):  # one image per block; blocks of 37 GT rows
        chunked = make(c, max_elements=budget)(scores, preds, points, labels, boxes, mask)
        for name, x, y in zip(whole._fields, whole, chunked):
            assert torch.equal(x, y), (budget, name)
