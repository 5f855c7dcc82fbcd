"""Sliced inference: the tile grid, boxes shifted back from their tile, duplicates across tiles merged,
``predict(..., slice=...)`` and ``detectkit predict --slice``.

Geometry is checked with :class:`WhiteBoxDetector`, a deterministic detector honouring the eval
contract (it boxes the white pixels of each input), so every expected box is known exactly; the
CLI runs on the tiny trained checkpoint of test_predict_paths.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_predict_paths import trained  # noqa: F401  the module-scoped trained checkpoint fixture

import detectkit
from detectkit.cli import main
from detectkit.errors import UserError
from detectkit.predict import predict
from detectkit.predict.slicing import SliceConfig, merge_detections, shift_boxes, tile_grid


class WhiteBoxDetector(nn.Module):
    """Eval contract (boxes [B,1,4], scores [B,1,1]): one box around the white pixels of each input,
    scored higher the more of the object it sees (as a real detector is surer of a whole object)."""

    strides = (32,)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, scores = [], []
        for image in images:
            ys, xs = torch.nonzero((image > 0.95).all(0), as_tuple=True)
            if len(xs):
                boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
                scores.append(min(0.3 + len(xs) / 1000, 0.99))
            else:
                boxes.append(torch.zeros(4))
                scores.append(0.0)
        return torch.stack(boxes)[:, None], torch.tensor(scores)[:, None, None]


def _image(h: int, w: int, square: tuple[int, int, int, int]) -> np.ndarray:
    img = np.full((h, w, 3), 40, np.uint8)
    x1, y1, x2, y2 = square
    img[y1:y2, x1:x2] = 255
    return img


def test_tile_grid_covers_the_image_with_the_overlap():
    cfg = SliceConfig(size=256, overlap=0.2)
    tiles = tile_grid(1000, 700, cfg)
    covered = np.zeros((1000, 700), bool)
    for x1, y1, x2, y2 in tiles:
        assert 0 <= x1 < x2 <= 700 and 0 <= y1 < y2 <= 1000 and (x2 - x1, y2 - y1) == (256, 256)
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    for axis in (0, 1):  # neighbours along each axis share at least 20% of the side
        starts = sorted({int(t[axis]) for t in tiles})
        assert all(b - a <= 256 - int(0.2 * 256) for a, b in zip(starts, starts[1:]))
    assert tile_grid(100, 200, cfg).tolist() == [[0, 0, 200, 100]]  # smaller than a tile: one tile


def test_shift_boxes_moves_tile_pixels_to_image_pixels():
    boxes = torch.tensor([[1.0, 2.0, 11.0, 12.0]])
    assert shift_boxes(boxes, (64, 128, 128, 192)).tolist() == [[65.0, 130.0, 75.0, 140.0]]


@pytest.mark.parametrize("merge", ["nmm", "nms"])
def test_boxes_on_a_tile_border_merge_to_one(merge):
    # one object seen whole by one tile and cut by the border of its neighbour, plus a far one
    boxes = torch.tensor([[100.0, 50, 140, 80], [120, 50, 140, 80], [300, 300, 320, 320]])
    scores = torch.tensor([0.6, 0.8, 0.7])
    labels = torch.tensor([0, 0, 0])
    out_boxes, out_scores, _ = merge_detections(boxes, scores, labels, SliceConfig(merge=merge))
    assert len(out_boxes) == 2 and out_scores.tolist() == pytest.approx([0.8, 0.7])
    # NMM keeps the union of the pieces, NMS the best-scored piece
    assert out_boxes[0].tolist() == ([100, 50, 140, 80] if merge == "nmm" else [120, 50, 140, 80])
    # other classes are other objects unless agnostic
    other = torch.tensor([0, 1, 0])
    assert len(merge_detections(boxes, scores, other, SliceConfig(merge=merge))[0]) == 3
    assert len(merge_detections(boxes, scores, other, SliceConfig(merge=merge), agnostic=True)[0]) == 2


def test_a_box_found_in_tile_i_j_lands_at_its_place_in_the_image():
    model = WhiteBoxDetector()
    square = (150, 90, 166, 104)  # inside tile row 1, column 2 of a 64 px, no-overlap grid
    img = _image(200, 300, square)
    sliced = predict(model, img, size=64, longest=None, slice=SliceConfig(size=64, overlap=0.0, full_image=False))
    assert sliced[0].boxes.tolist() == [list(map(float, square))]
    # cut by tile borders (x = 128, y = 64): the pieces and the overlapping tile's whole box merge into one
    border = (120, 56, 140, 72)
    cut = SliceConfig(size=64, overlap=0.5, full_image=False)
    assert predict(model, _image(200, 300, border), size=64, longest=None, slice=cut, batch_size=3)[0].boxes.tolist() \
        == [list(map(float, border))]
    # without overlap no tile sees it whole: four touching pieces, which is why tiles overlap
    apart = predict(model, _image(200, 300, border), size=64, longest=None,
                    slice=SliceConfig(size=64, overlap=0.0, full_image=False))
    assert len(apart[0]) == 4
    # unsliced, the same 300 px image shrinks into 64 px and the box comes back off by pixels
    whole = predict(model, img, size=64, longest=None)
    assert np.abs(whole[0].boxes - np.array(square)).max() > 1


def test_missing_sahi_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sahi.slicing", None)
    with pytest.raises(UserError, match=r"sliced inference needs the package 'sahi'.*detectkit\[slice\]"):
        tile_grid(100, 100, SliceConfig())


def test_cli_predict_slice_writes_the_sliced_predictions(trained, tmp_path, capsys):  # noqa: F811
    ckpt, _, images = trained
    out = tmp_path / "out"
    args = ["predict", "--source", str(images[0]), "--checkpoint", str(ckpt), "--save-dir", str(out), "--no-images"]
    assert main([*args, "--slice", "48", "--overlap", "0.25", "--slice-merge", "nms"]) == 0
    rows = json.loads((out / "predictions.json").read_text())
    cfg = SliceConfig(size=48, overlap=0.25, merge="nms")
    expected = detectkit.load(ckpt).predict(images[0], slice=cfg)[0].to_coco(0)
    assert rows and len(rows) == len(expected)
    for got, want in zip(rows, expected):
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-3) and got["score"] == pytest.approx(want["score"])
    capsys.readouterr()
    assert main([*args, "--slice", "48", "--overlap", "1.5"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--slice: slice overlap must be in [0, 1), got 1.5" in err


def test_ios_nms_equals_a_plain_greedy_suppression_across_row_blocks():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (700, 2))  # more boxes than one block of rows (512)
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (700, 2))], 1).astype(np.float32)
    scores, labels = rng.permutation(700).astype(np.float32) / 700, rng.integers(0, 2, 700)
    kept: list[int] = []
    for i in np.argsort(-scores):
        k = np.array([j for j in kept if labels[j] == labels[i]], int)
        if len(k):
            inter = (np.minimum(boxes[k, 2:], boxes[i, 2:]) - np.maximum(boxes[k, :2], boxes[i, :2])).clip(0).prod(1)
            area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
            if (inter / np.minimum(area(boxes[k]), area(boxes[i])) >= 0.5).any():
                continue
        kept.append(int(i))
    got = merge_detections(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels),
                           SliceConfig(merge="nms", match_metric="ios"), max_det=700)[0]
    assert got.numpy().tolist() == boxes[kept].tolist()
