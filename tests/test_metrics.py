"""The validation mAP (one faster-coco-eval run) against pycocotools on small hand-made cases:
per-class AP, size buckets, mar_1/10/100, crowd regions, the 100-per-image cap, and DDP with
uneven ranks and the sampler's repeated image. Also the PR arrays and confusion matrix that the
plotting callbacks read from the same run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectkit.modules.metrics import COCOMeanAveragePrecision, build_map_metric, summarize_map

STAT_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
             "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")  # pycocotools' stats order


# ---------------------------------------------------------------------------- cases
def _image(dets, gts, image_id=None):
    """``dets`` rows (x1, y1, x2, y2, score, label); ``gts`` rows (x1, y1, x2, y2, label[, iscrowd])."""
    d = np.asarray(dets, np.float32).reshape(-1, 6)
    g = np.asarray(gts, np.float64).reshape(-1, len(gts[0]) if len(gts) else 5)
    crowd = g[:, 5].astype(np.int64) if g.shape[1] > 5 else np.zeros(len(g), np.int64)
    return {"dets": d, "boxes": g[:, :4], "labels": g[:, 4].astype(np.int64), "iscrowd": crowd,
            "image_id": image_id}


def random_case(n_images: int, seed: int, classes: int = 3, dets_per_image: int = 12) -> list[dict]:
    """Objects of every COCO size (sides 4-200 px) in 3 classes, 1 in 12 a crowd region; noisy
    detections of them (some with the wrong class) plus random false positives."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n_images):
        n = int(rng.integers(1, 6))
        side = np.exp(rng.uniform(np.log(4), np.log(200), (n, 1))) * np.exp(rng.uniform(-0.3, 0.3, (n, 2)))
        xy = rng.uniform(0, 300, (n, 2))
        boxes = np.concatenate([xy, xy + side], 1)
        labels = rng.integers(0, classes, n)
        crowd = (rng.random(n) < 1 / 12).astype(np.int64)
        src = rng.integers(0, n, dets_per_image // 2)
        noisy = boxes[src] + rng.normal(0, 0.15, (len(src), 4)) * np.tile(side[src], 2)
        noisy_labels = np.where(rng.random(len(src)) < 0.2, rng.integers(0, classes, len(src)), labels[src])
        rand_xy = rng.uniform(0, 300, (dets_per_image - len(src), 2))
        rand = np.concatenate([rand_xy, rand_xy + rng.uniform(4, 120, (len(rand_xy), 2))], 1)
        dets = np.concatenate([
            np.concatenate([noisy, rng.uniform(0.3, 1, (len(src), 1)), noisy_labels[:, None]], 1),
            np.concatenate([rand, rng.uniform(0, 0.6, (len(rand), 1)), rng.integers(0, classes, (len(rand), 1))], 1),
        ])
        dets[:, 2:4] = np.maximum(dets[:, 2:4], dets[:, 0:2] + 0.5)
        gts = np.concatenate([boxes, labels[:, None], crowd[:, None]], 1)
        images.append(_image(dets, gts, image_id=100 + i))
    return images


# ---------------------------------------------------------------------------- references
def pycocotools_eval(images: list[dict], cap: int = 100) -> dict:
    """pycocotools on the same data as a COCO json, each image's detections cut to the top ``cap``
    by score (the COCO results rule the metric applies)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    anns, results, labels = [], [], set()
    for i, im in enumerate(images):
        for b, c, cr in zip(im["boxes"].tolist(), im["labels"].tolist(), im["iscrowd"].tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "iscrowd": int(cr),
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
            labels.add(int(c))
        d = im["dets"][np.argsort(-im["dets"][:, 4], kind="stable")][:cap].astype(np.float64)
        for x1, y1, x2, y2, s, c in d.tolist():
            results.append({"image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
            labels.add(int(c))
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in range(len(images))], "annotations": anns,
                  "categories": [{"id": c} for c in sorted(labels)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    p = ev.eval["precision"][:, :, :, 0, -1]
    per_class = {c: float(p[:, :, k][p[:, :, k] > -1].mean()) if (p[:, :, k] > -1).any() else -1.0
                 for k, c in enumerate(sorted(labels))}
    return {"stats": dict(zip(STAT_KEYS, (float(s) for s in ev.stats))), "per_class": per_class,
            "precision": ev.eval["precision"]}


def metric_eval(images: list[dict], metric: COCOMeanAveragePrecision | None = None, batch: int = 4) -> dict:
    metric = metric or build_map_metric()
    for s in range(0, len(images), batch):
        chunk = images[s:s + batch]
        metric.update([torch.from_numpy(im["dets"]) for im in chunk],
                      [{"boxes": torch.from_numpy(im["boxes"]).float(), "labels": torch.from_numpy(im["labels"]),
                        "iscrowd": torch.from_numpy(im["iscrowd"]), "image_id": im["image_id"]} for im in chunk])
    res = metric.compute()
    return {"stats": {k: float(res[k]) for k in STAT_KEYS if k in res},
            "per_class": dict(zip(res["classes"].reshape(-1).tolist(), res["map_per_class"].reshape(-1).tolist())),
            "metric": metric}


def assert_same(ours: dict, ref: dict, tol: float = 1e-6) -> None:
    for k in STAT_KEYS:
        assert ours["stats"][k] == pytest.approx(ref["stats"][k], abs=tol), (k, ours["stats"], ref["stats"])
    assert ours["per_class"].keys() == ref["per_class"].keys()
    for c, ap in ref["per_class"].items():
        assert ours["per_class"][c] == pytest.approx(ap, abs=tol), (c, ours["per_class"], ref["per_class"])


# ---------------------------------------------------------------------------- tests
def test_equals_pycocotools_on_mixed_sizes_classes_and_crowds() -> None:
    images = random_case(24, seed=0)
    ours, ref = metric_eval(images), pycocotools_eval(images)
    assert_same(ours, ref)
    # the case exercises what it claims: every size bucket and class defined, some crowd regions
    assert all(ref["stats"][k] > 0 for k in ("map_small", "map_medium", "map_large"))
    assert sum(int(im["iscrowd"].sum()) for im in images) > 0 and len(ref["per_class"]) == 3
    np.testing.assert_allclose(ours["metric"].last_result.precision[..., -1], ref["precision"][..., -1], atol=1e-6)


def test_per_class_ap_hand_checked() -> None:
    images = [
        # class 0: two objects found exactly -> AP 1; class 1: one object, its detection ranked below
        # a false positive -> precision 0.5 at every recall -> AP 0.5; class 2 only predicted -> no AP
        _image([[0, 0, 40, 40, 0.9, 0], [100, 100, 140, 140, 0.8, 1], [50, 50, 90, 90, 0.7, 1], [0, 0, 9, 9, 0.6, 2]],
               [[0, 0, 40, 40, 0], [50, 50, 90, 90, 1]], image_id=1),
        _image([[10, 10, 60, 60, 0.95, 0]], [[10, 10, 60, 60, 0]], image_id=2),
    ]
    ours, ref = metric_eval(images), pycocotools_eval(images)
    assert_same(ours, ref)
    assert ours["per_class"][0] == pytest.approx(1.0) and ours["per_class"][1] == pytest.approx(0.5)
    assert ours["per_class"][2] == -1  # no ground truth: left out of the mean, as pycocotools does
    assert ours["stats"]["map"] == pytest.approx(0.75)
    summary = summarize_map(ours["metric"].compute(), ["zero", "one", "two"])
    assert summary["AP/zero"] == pytest.approx(1.0) and summary["AP/one"] == pytest.approx(0.5)
    assert "AP/two" not in summary


def test_size_buckets_and_mar_hand_checked() -> None:
    # a small (20x20) object found, a large (150x150) one found only at low IoU, no medium object;
    # two objects in one image: mar_1 counts only the top-scored detection
    images = [_image([[0, 0, 20, 20, 0.9, 0], [200, 200, 350, 300, 0.8, 0]],
                     [[0, 0, 20, 20, 0], [200, 200, 350, 350, 0]], image_id=7)]
    ours, ref = metric_eval(images), pycocotools_eval(images)
    assert_same(ours, ref)
    s = ours["stats"]
    assert s["map_small"] == pytest.approx(1.0) and s["map_medium"] == -1
    assert 0 < s["map_large"] < 0.5  # IoU 2/3 -> counts at thresholds 0.50-0.65 only
    assert s["mar_1"] == pytest.approx(0.5) and s["mar_10"] > s["mar_1"] and s["mar_100"] == s["mar_10"]


def test_crowd_region_is_neither_missed_nor_a_false_positive() -> None:
    crowd_gt = [[0, 0, 40, 40, 0, 0], [100, 100, 300, 300, 0, 1]]  # the second is a crowd region
    with_crowd_det = [[0, 0, 40, 40, 0.5, 0], [120, 120, 160, 160, 0.9, 0]]  # high-scored box inside the crowd
    ours, ref = metric_eval([_image(with_crowd_det, crowd_gt, 1)]), pycocotools_eval([_image(with_crowd_det, crowd_gt, 1)])
    assert_same(ours, ref)
    assert ours["stats"]["map"] == pytest.approx(1.0) and ours["stats"]["mar_100"] == pytest.approx(1.0)
    m = ours["metric"].confusion_matrix(num_classes=1, conf=0.25, iou=0.5)
    assert m.tolist() == [[1, 0], [0, 0]]  # the box in the crowd region is not a false detection


def test_keeps_the_top_100_detections_of_an_image() -> None:
    # the object is found only by the 101st-best detection: cut (COCO result rule), so AP 0
    dets = [[200 + i, 200, 230 + i, 230, 0.9 - i * 1e-3, 0] for i in range(100)] + [[0, 0, 30, 30, 0.5, 0]]
    images = [_image(dets, [[0, 0, 30, 30, 0]], 3)]
    ours = metric_eval(images)
    assert_same(ours, pycocotools_eval(images, cap=100))
    assert ours["stats"]["map"] == 0 and len(ours["metric"].last_result.detections) == 100
    with_1000 = metric_eval(images, COCOMeanAveragePrecision(max_detection_thresholds=(1, 10, 1000)))
    assert with_1000["stats"]["map"] > 0 and len(with_1000["metric"].last_result.detections) == 101
    assert "mar_1000" in with_1000["metric"].last_result.stats


def test_letterboxed_rows_are_scored_in_original_pixels() -> None:
    images = random_case(6, seed=1)
    ref = metric_eval(images)
    metric = build_map_metric()
    scale, pad = 0.5, (3, 7)
    for im in images:
        rows = torch.from_numpy(im["dets"]).clone()
        rows[:, 0:4:2] = rows[:, 0:4:2] * scale + pad[0]
        rows[:, 1:4:2] = rows[:, 1:4:2] * scale + pad[1]
        meta = {"image_id": im["image_id"], "orig_size": (600, 600), "scale": scale, "pad": pad,
                "boxes": torch.from_numpy(im["boxes"]).float(), "labels": torch.from_numpy(im["labels"]),
                "iscrowd": torch.from_numpy(im["iscrowd"])}
        metric.update([rows], [meta], letterboxed=True)
    res = metric.compute()
    for k in STAT_KEYS:
        assert float(res[k]) == pytest.approx(ref["stats"][k], abs=1e-5), k


def test_repeated_images_count_once_and_order_does_not_matter() -> None:
    images = random_case(10, seed=2)
    ref = metric_eval(images)
    shuffled = [images[i] for i in (7, 3, 9, 0, 5, 1, 8, 2, 6, 4)] + images[:3]  # + a sampler's padding
    assert_same(metric_eval(shuffled, batch=3), ref, tol=0)


def test_pr_curve_and_result_come_from_the_one_run() -> None:
    images = random_case(12, seed=3)
    ref = pycocotools_eval(images)
    metric = metric_eval(images)["metric"]
    result = metric.last_result
    recall, prec, classes = metric.pr_curve(iou=0.5)
    assert metric.last_result is result  # cached: no second evaluation
    assert recall.shape == (101,) and prec.shape == (len(classes), 101) and classes == [0, 1, 2]
    np.testing.assert_allclose(prec, ref["precision"][0, :, :, 0, -1].T, atol=1e-6)
    ap50 = result.ap_per_class(iou=0.5)
    assert float(np.mean(ap50[ap50 > -1])) == pytest.approx(ref["stats"]["map_50"], abs=1e-6)
    metric.reset()
    assert metric.last_result is result  # still readable after the module's reset


def test_confusion_matrix_hand_checked() -> None:
    images = [_image([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 1], [50, 50, 60, 60, 0.7, 1], [0, 0, 10, 10, 0.1, 1]],
                     [[0, 0, 10, 10, 0], [20, 20, 30, 30, 0], [70, 70, 80, 80, 1]], 1)]
    m = metric_eval(images)["metric"].confusion_matrix(num_classes=2, conf=0.25, iou=0.5)
    # rows predicted, columns true, index 2 = background; the 0.1 detection is below conf
    assert m.tolist() == [[1, 0, 0], [1, 0, 1], [0, 1, 0]]


def test_empty_and_bad_input() -> None:
    metric = build_map_metric()
    with pytest.warns(UserWarning, match="before the ``update``"):
        res = metric.compute()
    assert float(res["map"]) == -1 and res["classes"].numel() == 0
    metric.update([torch.zeros(0, 6)], [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}])
    res = metric.compute()  # an object and no detection: AP and recall 0 (not undefined), one missed box
    assert float(res["map"]) == 0 and float(res["mar_100"]) == 0
    assert metric.confusion_matrix(num_classes=2).tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 0]]
    metric.reset()
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        metric.update([torch.zeros(0, 6), torch.zeros(0, 6)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    with pytest.raises(ValueError, match=r"prediction 0: expected \[N, 6\]"):
        metric.update([torch.zeros(3, 5)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    with pytest.raises(ValueError, match="target 0: 2 boxes but 1 labels"):
        metric.update([torch.zeros(0, 6)], [{"boxes": torch.zeros(2, 4), "labels": torch.zeros(1)}])


# ---------------------------------------------------------------------------- DDP
WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, shards: list[list[int]], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        images = random_case(9, seed=4)
        mine = [images[i] for i in shards[rank]]
        out = metric_eval(mine, batch=2)
        m = out["metric"]
        cm = m.confusion_matrix(num_classes=3)
        _, prec, _ = m.pr_curve()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
            "stats": out["stats"], "per_class": out["per_class"], "confusion": cm.tolist(),
            "pr_sum": float(prec.sum()), "images": int(m.last_result.num_images),
            "local_images": sum(len(t) for t in m.image_ids),  # unsynced again after compute
        }))
    finally:
        dist.destroy_process_group()


def test_ddp_uneven_ranks_with_padding_equal_one_process_and_pycocotools(tmp_path: Path) -> None:
    images = random_case(9, seed=4)
    # rank 0: 6 images; rank 1: 3 images plus two repeats of rank 0's images (sampler-style padding)
    shards = [[0, 2, 4, 6, 8, 1], [3, 5, 7, 0, 2]]
    mp.spawn(_ddp_worker, args=(_free_port(), shards, str(tmp_path)), nprocs=WORLD, join=True)
    single = metric_eval(images)
    ref = pycocotools_eval(images)
    for rank in range(WORLD):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        got["per_class"] = {int(k): v for k, v in got["per_class"].items()}
        assert got["images"] == 9 and got["local_images"] == len(shards[rank])
        assert_same(got, single, tol=0)  # the same numbers as one process, exactly
        assert_same(got, ref)
        assert got["confusion"] == single["metric"].confusion_matrix(num_classes=3).tolist()
        assert got["pr_sum"] == pytest.approx(float(single["metric"].pr_curve()[1].sum()))
