"""The loader's speed options keep samples identical: the OpenCV JPEG path, the window-only mosaic
and the RAM cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from detectkit.data.dataset import DetectionDataset
from detectkit.data.formats import open_dataset
from detectkit.data.images import read_image, to_rgb
from detectkit.data.mosaic import _resize_longest, mosaic4
from detectkit.data.synthetic import SyntheticConfig, generate_synthetic
from detectkit.data.transforms import AugmentConfig


def _noise_jpeg(path, w=97, h=61, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[::7] = 30  # some structure so chroma subsampling matters
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, quality=90)
    return path


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_fast_path_matches_pillow_pixels(tmp_path, mode):
    path = _noise_jpeg(tmp_path / "a.jpg", mode=mode)
    with Image.open(path) as img:
        reference = to_rgb(img, path)  # Pillow's decode, the reference
    got = read_image(path)
    assert got.dtype == np.uint8 and got.shape == (61, 97, 3)
    np.testing.assert_array_equal(got, reference)


def _mosaic_reference(samples, size, rng, pad_value=114, min_visibility=0.1):
    """The textbook construction: fill a 2S canvas, crop the S window (what mosaic4 must equal)."""
    s = size
    canvas = np.full((2 * s, 2 * s, 3), pad_value, np.uint8)
    xc, yc = (int(v) for v in rng.uniform(0.5 * s, 1.5 * s, 2))
    bxs, lbs = [], []
    for k, (img, boxes, labels) in enumerate(samples):
        img, r = _resize_longest(img, s)
        h, w = img.shape[:2]
        x1 = max(xc - w, 0) if k in (0, 2) else xc
        y1 = max(yc - h, 0) if k in (0, 1) else yc
        x2 = xc if k in (0, 2) else min(xc + w, 2 * s)
        y2 = yc if k in (0, 1) else min(yc + h, 2 * s)
        sx1 = w - (x2 - x1) if k in (0, 2) else 0
        sy1 = h - (y2 - y1) if k in (0, 1) else 0
        canvas[y1:y2, x1:x2] = img[sy1 : sy1 + y2 - y1, sx1 : sx1 + x2 - x1]
        b = np.asarray(boxes, np.float32) * r + np.array([x1 - sx1, y1 - sy1] * 2, np.float32)
        bxs.append(b)
        lbs.append(labels)
    ox, oy = xc - s // 2, yc - s // 2
    return canvas[oy : oy + s, ox : ox + s], np.concatenate(bxs) - np.array([ox, oy, ox, oy], np.float32)


def test_mosaic_window_equals_cropped_canvas():
    rng = np.random.default_rng(5)
    for trial in range(25):
        size = int(rng.choice([32, 64, 96]))
        samples = []
        for _ in range(4):
            h, w = (int(v) for v in rng.integers(8, 160, 2))
            boxes = np.array([[1, 1, w - 1, h - 1]], np.float32)
            samples.append((rng.integers(0, 256, (h, w, 3), dtype=np.uint8), boxes, np.array([0])))
        img, _, _ = mosaic4(samples, size, np.random.default_rng(trial))
        ref_img, _ = _mosaic_reference(samples, size, np.random.default_rng(trial))
        np.testing.assert_array_equal(img, ref_img, err_msg=f"trial {trial}")
        # built in a reused scratch buffer full of the last sample's pixels: every pixel is rewritten
        scratch = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        again, _, _ = mosaic4(samples, size, np.random.default_rng(trial), out=scratch)
        assert again is scratch
        np.testing.assert_array_equal(again, ref_img, err_msg=f"trial {trial}, reused buffer")


def test_mosaic_box_lands_on_its_pixels():
    """Tile 3 (bottom right) of a 64 mosaic: a box drawn in white must come out over white pixels."""
    size = 64
    samples = []
    for k in range(4):
        img = np.full((64, 64, 3), 40 * (k + 1), np.uint8)
        samples.append((img, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))
    img3 = np.zeros((64, 64, 3), np.uint8)
    img3[4:20, 6:30] = 255
    samples[3] = (img3, np.array([[6, 4, 30, 20]], np.float32), np.array([2]))
    rng = np.random.default_rng(0)
    xc, yc = (int(v) for v in np.random.default_rng(0).uniform(0.5 * size, 1.5 * size, 2))
    out, boxes, labels = mosaic4(samples, size, rng)
    ox, oy = xc - size // 2, yc - size // 2
    expected = np.array([6 + xc - ox, 4 + yc - oy, 30 + xc - ox, 20 + yc - oy], np.float32).clip(0, size)
    assert labels.tolist() == [2]
    np.testing.assert_allclose(boxes[0], expected)
    x1, y1, x2, y2 = (int(v) for v in boxes[0])
    assert (out[y1:y2, x1:x2] == 255).all()
    # and the pixels just outside the box are the tile's black background (or the window edge)
    if y2 < size:
        assert (out[y2, x1:x2] == 0).all()


@pytest.fixture(scope="module")
def big_images(tmp_path_factory):
    """Images larger than the training size, so the cache really shrinks them."""
    return generate_synthetic(
        tmp_path_factory.mktemp("big"), SyntheticConfig(train_images=8, val_images=0, size=160, seed=4)
    )


@pytest.mark.parametrize("mosaic_prob", [0.0, 1.0])
def test_ram_cache_gives_identical_samples(big_images, mosaic_prob):
    split = open_dataset(big_images).load("train")
    aug = AugmentConfig(mosaic_prob=mosaic_prob, mixup_prob=0.5, degrees=5.0, hsv_prob=1.0)
    plain = DetectionDataset(split, 64, train=True, augment=aug, seed=2)
    cached = DetectionDataset(split, 64, train=True, augment=aug, seed=2, cache="ram")
    assert max(cached._cached[0][0].shape[:2]) == 64  # shrunk once, at construction
    for i in range(len(plain)):
        a, b = plain[i], cached[i]
        assert np.array_equal(a["image"].numpy(), b["image"].numpy()), i
        np.testing.assert_allclose(a["boxes"].numpy(), b["boxes"].numpy(), atol=1e-4)
        assert a["labels"].tolist() == b["labels"].tolist()
        assert a["meta"]["orig_size"] == b["meta"]["orig_size"]
        assert a["meta"]["scale"] == pytest.approx(b["meta"]["scale"])
        assert a["meta"]["pad"] == b["meta"]["pad"]


def test_ram_cache_is_not_upsampled_when_the_size_grows(big_images):
    split = open_dataset(big_images).load("train")
    aug = AugmentConfig(mosaic_prob=1.0, mixup_prob=0.0)
    plain = DetectionDataset(split, 64, train=True, augment=aug, seed=2)
    cached = DetectionDataset(split, 64, train=True, augment=aug, seed=2, cache="ram")
    for ds in (plain, cached):
        ds.set_image_size(128)  # progressive resizing past the cached size: read the files again
    a, b = plain[3], cached[3]
    assert b["image"].shape == (3, 128, 128)
    assert np.array_equal(a["image"].numpy(), b["image"].numpy())


def test_cache_mode_is_checked(big_images):
    with pytest.raises(ValueError, match="cache must be one of"):
        DetectionDataset(open_dataset(big_images).load("train"), 64, cache="disk?")


@pytest.mark.parametrize("degrees", [0.0, 12.0])  # the resize path and the warp path
def test_affine_boxes_follow_the_pixels(degrees):
    """A white rectangle with its exact box: after the random affine (+flip) the returned box is
    the bounding box of the white pixels (within a pixel; when rotated it holds them and IoU > 0.8),
    for many random draws."""
    from detectkit.data.transforms import random_affine

    size = 96
    cfg = AugmentConfig(degrees=degrees, translate=0.25, scale=(0.5, 1.5), min_visibility=0.0)
    checked = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        img = np.zeros((size, size, 3), np.uint8)
        x1, y1 = (int(v) for v in rng.integers(5, 40, 2))
        x2, y2 = x1 + int(rng.integers(15, 50)), y1 + int(rng.integers(15, 50))
        img[y1:y2, x1:x2] = 255
        box = np.array([[x1, y1, x2, y2]], np.float32)
        out, boxes, labels = random_affine(img, box, np.array([1]), cfg, 1.0, rng, flip=bool(seed % 2))
        assert out.shape == img.shape and out.dtype == np.uint8
        ys, xs = np.nonzero(out[..., 0] > 127)
        if not len(boxes):
            assert len(xs) < 40  # dropped only when (nearly) nothing of it is left
            continue
        assert labels.tolist() == [1]
        seen = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        if degrees:  # corner tips of a rotated box are thin: they may fall under the threshold
            b = boxes[0]
            assert (seen[:2] >= b[:2] - 1).all() and (seen[2:] <= b[2:] + 1).all(), f"seed {seed}"
            inter = np.prod(np.clip(np.minimum(b[2:], seen[2:]) - np.maximum(b[:2], seen[:2]), 0, None))
            iou = inter / (np.prod(b[2:] - b[:2]) + np.prod(seen[2:] - seen[:2]) - inter)
            assert iou > 0.8, f"seed {seed}: {b} vs {seen}"
        else:
            np.testing.assert_allclose(boxes[0], seen, atol=1.0, err_msg=f"seed {seed}")
        checked += 1
    assert checked > 20


def test_affine_scale_translate_matches_warp_statistically():
    """The resize path equals a general warpAffine of the same matrix up to resampling noise."""
    import cv2

    from detectkit.data.transforms import random_affine, sample_affine

    rng_img = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng_img.integers(0, 256, (128, 128, 3), dtype=np.uint8), (9, 9), 3)
    cfg = AugmentConfig(translate=0.2, scale=(0.6, 1.4))
    for seed in range(10):
        mat = sample_affine(cfg, 1.0, np.random.default_rng(seed), 128, flip=seed % 2 == 1)
        half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
        centres = (np.linalg.inv(half) @ np.vstack([mat, [0, 0, 1]]) @ half)[:2]
        ref = cv2.warpAffine(img, centres, (128, 128), borderMode=cv2.BORDER_CONSTANT, borderValue=(114,) * 3)
        out, _, _ = random_affine(
            img, np.zeros((0, 4)), np.zeros(0), cfg, 1.0, np.random.default_rng(seed), seed % 2 == 1
        )
        inner = (slice(8, -8), slice(8, -8))  # away from the snapped borders
        assert np.abs(out[inner].astype(int) - ref[inner]).mean() < 3.0, seed


def test_hsv_keeps_grey_grey_and_is_a_pure_function_of_the_seed():
    from detectkit.data.transforms import random_hsv

    cfg = AugmentConfig(hsv_prob=1.0)
    grey = np.full((8, 8, 3), 100, np.uint8)
    colour = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for seed in range(10):
        g = random_hsv(grey, cfg, 1.0, np.random.default_rng(seed))
        assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()  # value shift only
        a = random_hsv(colour, cfg, 1.0, np.random.default_rng(seed))
        b = random_hsv(colour, cfg, 1.0, np.random.default_rng(seed))
        assert np.array_equal(a, b)
    assert np.array_equal(random_hsv(colour, cfg, 0.0, np.random.default_rng(3)), colour)


@pytest.mark.parametrize("scale", [0.5, 1.4])
def test_colour_inside_the_warp_touches_the_image_not_the_padding(scale):
    """The HSV jitter runs inside the axis-aligned warp (on the smaller of crop and patch): the
    image part gets it, the padding keeps pad_value (as the letterbox padding at inference)."""
    from detectkit.data.transforms import random_affine

    cfg = AugmentConfig(translate=0.0, scale=(scale, scale), flip_prob=0.0)
    img = np.full((64, 64, 3), 40, np.uint8)
    calls = []

    def colour(x):
        calls.append(x.shape)
        return 255 - x

    out, _, _ = random_affine(img, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), cfg, 1.0,
                              np.random.default_rng(0), colour=colour)
    assert len(calls) == 1 and calls[0][0] * calls[0][1] <= 64 * 64 * min(scale, 1 / scale) ** 2 + 2 * 64
    inside = out[16:48, 16:48] if scale < 1 else out
    assert (inside == 215).all()
    if scale < 1:  # a 32 px image centred in 64: the rest is padding, untouched
        assert (out[:10] == cfg.pad_value).all() and (out[:, -10:] == cfg.pad_value).all()


def test_hsv_gain_mode_follows_the_ultralytics_gains():
    """``hsv_mode: gain`` reads hsv_h/s/v as ultralytics does: hue shifted by u_h * h * 180,
    saturation and value multiplied by 1 + u * gain (u uniform in [-1, 1], the same draw)."""
    import cv2

    from detectkit.data.transforms import random_hsv

    cfg = AugmentConfig(hsv_prob=1.0, hsv_mode="gain", hsv_h=0.015, hsv_s=0.7, hsv_v=0.4)
    hsv = np.zeros((4, 4, 3), np.uint8)
    hsv[..., 0], hsv[..., 1], hsv[..., 2] = 60, 100, 120  # green, mid saturation and value
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        rng.random()  # the probability draw
        uh, us, uv = rng.uniform(-1, 1, 3)
        out = cv2.cvtColor(random_hsv(rgb, cfg, 1.0, np.random.default_rng(seed)), cv2.COLOR_RGB2HSV)
        want = (np.mod(60 + np.trunc(uh * 0.015 * 180), 180), 100 * (1 + us * 0.7), 120 * (1 + uv * 0.4))
        np.testing.assert_allclose(out[0, 0].astype(float), want, atol=2)  # HSV<->RGB rounding
    with pytest.raises(ValueError, match="hsv_mode"):
        AugmentConfig(hsv_mode="multiply")


def test_ram_cache_leaves_bad_images_to_the_counted_skip(tmp_path):
    """An unreadable image is not cached: reading it counts and logs the skip as without the cache."""
    root = generate_synthetic(tmp_path / "d", SyntheticConfig(train_images=4, val_images=0, size=64, seed=1))
    split = open_dataset(root).load("train")
    bad = split.records[1].path
    kwargs = dict(train=True, augment=AugmentConfig(mosaic_prob=0.0, mixup_prob=0.0), check=False)
    ds = DetectionDataset(split, 64, skip_bad_images=True, cache="ram", **kwargs)
    assert ds._cached[1] is not None and ds.bad_images_skipped == 0
    bad.write_bytes(b"not an image")
    ds = DetectionDataset(split, 64, skip_bad_images=True, cache="ram", **kwargs)
    assert ds._cached[1] is None and ds.bad_images_skipped == 0
    sample = ds[1]
    assert ds.bad_images_skipped == 1 and sample["meta"]["index"] == 2


def test_collate_packs_meta_tensors_into_one_storage(big_images):
    """Per-image meta tensors become views of one tensor per key (one shared-memory segment per key
    when a worker sends the batch), with the same values."""
    from detectkit.data.collate import collate

    ds = DetectionDataset(open_dataset(big_images).load("train"), 64)
    samples = [ds[i] for i in range(4)]
    expected = [(s["meta"]["boxes"].clone(), s["meta"]["labels"].clone()) for s in samples]
    batch = collate(samples)
    storages = {m["boxes"].untyped_storage().data_ptr() for m in batch["meta"]}
    assert len(storages) == 1
    for m, (boxes, labels) in zip(batch["meta"], expected):
        assert torch.equal(m["boxes"], boxes) and torch.equal(m["labels"], labels)


def test_collate_images_equal_a_plain_stack(big_images):
    """Dataset samples (CHW views of HWC arrays) and plain contiguous CHW tensors collate alike."""
    from detectkit.data.collate import collate

    ds = DetectionDataset(open_dataset(big_images).load("train"), 64, train=True, seed=1)
    samples = [ds[i] for i in range(3)]
    reference = torch.stack([s["image"].contiguous() for s in samples])
    assert torch.equal(collate(samples)["images"], reference)
    plain = [dict(s, image=s["image"].contiguous()) for s in samples]
    assert torch.equal(collate(plain)["images"], reference)
    with pytest.raises(ValueError, match="uint8"):
        collate([dict(samples[0], image=samples[0]["image"].float())])


def test_reduced_jpeg_decode_scales_pixels_and_edges(tmp_path):
    """A JPEG at least twice the training size decodes at 1/k; an edge at x lands on x / k."""
    import cv2

    from detectkit.data.images import read_image_reduced

    img = np.full((150, 203, 3), 20, np.uint8)
    img[40:80, 60:140] = 240
    path = tmp_path / "big.jpg"
    Image.fromarray(img).save(path, quality=95)
    full, k1 = read_image_reduced(path, None)
    assert k1 == 1 and full.shape == (150, 203, 3)
    half, k = read_image_reduced(path, 64)  # 203 >= 2 * 64 but < 4 * 64
    assert k == 2 and half.shape == (75, 102, 3)
    quarter, k4 = read_image_reduced(path, 50)
    assert k4 == 4 and quarter.shape == (38, 51, 3)
    ys, xs = np.nonzero(half[..., 0] > 128)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (30, 20, 70, 40)
    ref = cv2.resize(full, (102, 75), interpolation=cv2.INTER_AREA)
    assert np.abs(half.astype(int) - ref).mean() < 3
    png = tmp_path / "big.png"
    Image.fromarray(img).save(png)
    assert read_image_reduced(png, 64)[1] == 1  # only JPEG has DCT scaling


def test_dataset_boxes_follow_a_reduced_decode(tmp_path):
    """Training on images 3x the input size: the box still covers its object after decode at 1/2."""
    from data_helpers import write_coco

    img = np.full((192, 240, 3), 30, np.uint8)
    img[60:120, 90:180] = 250
    (tmp_path / "images").mkdir()
    Image.fromarray(img).save(tmp_path / "images" / "a.jpg", quality=95)
    write_coco(
        tmp_path,
        images=[{"id": 1, "file_name": "images/a.jpg", "width": 240, "height": 192}],
        annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [90, 60, 90, 60], "iscrowd": 0}],
        categories=[{"id": 1, "name": "thing"}],
    )
    split = open_dataset(tmp_path).load()
    aug = AugmentConfig(
        mosaic_prob=0.0, mixup_prob=0.0, translate=0.0, scale=(1.0, 1.0), hsv_prob=0.0, flip_prob=0.0
    )
    s = DetectionDataset(split, 64, train=True, augment=aug)[0]
    x1, y1, x2, y2 = s["boxes"][0].tolist()
    assert (x1, y1, x2, y2) == pytest.approx((24, 16, 48, 32), abs=0.01)  # 64 / 240 of the original box
    white = s["image"][0].numpy() > 128
    ys, xs = np.nonzero(white)
    assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1 and abs(ys.min() - y1) <= 1
    assert s["meta"]["orig_size"] == (192, 240) and s["meta"]["scale"] == pytest.approx(64 / 240)
