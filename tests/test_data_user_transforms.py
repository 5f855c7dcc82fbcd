"""User albumentations pipelines (``data.augment.extra``): boxes follow the pixels under every
geometric transform, pixel-only transforms leave boxes alone, bad names are one named line, the
key round-trips through LightningCLI and the fast path never imports albumentations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from detectkit.cli import main
from detectkit.data.dataset import DetectionDataset
from detectkit.data.formats import open_dataset
from detectkit.data.synthetic import SyntheticConfig, generate_synthetic
from detectkit.data.transforms import AugmentConfig
from detectkit.data.user_transforms import apply_pipeline, build_pipeline
from detectkit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
NEAREST = cv2.INTER_NEAREST  # no blended edge colours: a pixel is either a box's colour or not
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
BOXES = np.array([[12, 20, 52, 60], [70, 16, 118, 40], [40, 78, 100, 112]], np.float32)

GEOMETRIC = {
    "HorizontalFlip": {"name": "HorizontalFlip", "p": 1},
    "VerticalFlip": {"name": "VerticalFlip", "p": 1},
    "Transpose": {"name": "Transpose", "p": 1},
    "RandomRotate90": {"name": "RandomRotate90", "p": 1},
    "Affine": {"name": "Affine", "rotate": [15, 25], "scale": [0.8, 0.9], "translate_px": [-6, 6], "shear": [3, 6],
               "interpolation": NEAREST, "p": 1},
    "Perspective": {"name": "Perspective", "scale": [0.05, 0.08], "interpolation": NEAREST, "p": 1},
    "RandomResizedCrop": {"name": "RandomResizedCrop", "size": [96, 96], "scale": [0.6, 0.9],
                          "interpolation": NEAREST, "p": 1},
    "RandomSizedBBoxSafeCrop": {"name": "RandomSizedBBoxSafeCrop", "height": 112, "width": 112,
                                "interpolation": NEAREST, "p": 1},
    "serialized SafeRotate": {"__class_fullname__": "SafeRotate", "limit": [30, 30], "interpolation": NEAREST,
                              "p": 1},
}
PIXEL_ONLY = [
    {"name": "RandomBrightnessContrast", "brightness_limit": [0.2, 0.3], "p": 1},
    {"name": "GaussNoise", "p": 1},
    {"name": "OneOf", "transforms": [{"name": "Blur", "blur_limit": [3, 5]}, {"name": "MedianBlur", "blur_limit": 3}],
     "p": 1},
    {"name": "ToGray", "p": 1},
]


def _drawn() -> np.ndarray:
    """Grey 128x128 image with each box filled with its own pure colour."""
    img = np.full((128, 128, 3), 114, np.uint8)
    for (x1, y1, x2, y2), c in zip(BOXES.astype(int), COLOURS):
        img[y1:y2, x1:x2] = c
    return img


def _colour_box(img: np.ndarray, colour: np.ndarray) -> np.ndarray | None:
    """The pixel-edge xyxy box around the pixels of ``colour`` (None if none is left)."""
    ys, xs = np.nonzero(np.abs(img.astype(int) - colour.astype(int)).sum(-1) < 30)
    if not len(xs):
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_boxes_follow_the_drawn_rectangles_under_each_geometric_transform(name):
    pipe = build_pipeline([GEOMETRIC[name]], min_box_size=2, min_visibility=0.1)
    img = _drawn()
    for seed in range(3):
        out, boxes, labels = apply_pipeline(pipe, img, BOXES, np.arange(3), np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape[2] == 3
        assert len(labels) >= 1 and len(boxes) == len(labels)
        for box, label in zip(boxes, labels):
            region = _colour_box(out, COLOURS[label])
            assert region is not None, f"{name}: box {label} kept but its colour is gone"
            # the box is the (clipped) hull of the moved rectangle: within 2 px of the drawn colour
            assert np.abs(region - box).max() <= 2.0, f"{name} (seed {seed}): box {box} vs pixels {region}"
        for label in set(range(3)) - set(labels.tolist()):  # a dropped box: (almost) nothing of it is left
            region = _colour_box(out, COLOURS[label])
            area = 0 if region is None else (region[2] - region[0]) * (region[3] - region[1])
            full = (BOXES[label, 2] - BOXES[label, 0]) * (BOXES[label, 3] - BOXES[label, 1])
            assert area < 0.25 * full, f"{name}: box {label} dropped while most of it is visible"


def test_a_geometric_transform_moves_the_boxes():
    pipe = build_pipeline([GEOMETRIC["HorizontalFlip"]])
    _, boxes, labels = apply_pipeline(pipe, _drawn(), BOXES, np.arange(3), np.random.default_rng(0))
    assert labels.tolist() == [0, 1, 2]
    np.testing.assert_allclose(boxes, np.stack([128 - BOXES[:, 2], BOXES[:, 1], 128 - BOXES[:, 0], BOXES[:, 3]], 1))


@pytest.mark.parametrize("spec", PIXEL_ONLY, ids=lambda s: s["name"])
def test_a_pixel_only_transform_leaves_boxes_untouched(spec):
    pipe = build_pipeline([spec])
    img = _drawn()
    out, boxes, labels = apply_pipeline(pipe, img, BOXES, np.arange(3), np.random.default_rng(0))
    assert not np.array_equal(out, img)  # it did run
    np.testing.assert_array_equal(boxes, BOXES)
    assert labels.tolist() == [0, 1, 2]


def test_clipping_and_min_visibility_follow_the_augment_config():
    """A box pushed mostly out of the image is clipped, or dropped under min_visibility."""
    shift = {"name": "Affine", "translate_px": {"x": [-70, -70], "y": [0, 0]}, "p": 1}
    boxes = np.array([[30, 10, 80, 60]], np.float32)  # 50 px wide: 10 px (20%) stay after -70
    img = np.zeros((128, 128, 3), np.uint8)
    _, kept, _ = apply_pipeline(build_pipeline([shift], min_visibility=0.1), img, boxes, [0], np.random.default_rng(0))
    np.testing.assert_allclose(kept, [[0, 10, 10, 60]], atol=1e-4)
    _, gone, _ = apply_pipeline(build_pipeline([shift], min_visibility=0.3), img, boxes, [0], np.random.default_rng(0))
    assert len(gone) == 0


def test_same_rng_same_sample_and_transforms_draw_independently():
    pipe = build_pipeline([{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}])
    img = _drawn()
    runs = [apply_pipeline(pipe, img, BOXES, np.arange(3), np.random.default_rng(s))[1] for s in range(40)]
    again = [apply_pipeline(pipe, img, BOXES, np.arange(3), np.random.default_rng(s))[1] for s in range(40)]
    assert all(np.array_equal(a, b) for a, b in zip(runs, again))
    hflip = [bool(b[0, 0] > 64) for b in runs]
    vflip = [bool(b[0, 1] > 64) for b in runs]
    assert hflip != vflip and any(h and not v for h, v in zip(hflip, vflip))  # not one shared coin


def test_unknown_transform_name_is_one_line_with_close_matches():
    with pytest.raises(UserError) as e:
        AugmentConfig(extra=[{"name": "HorizontalFlip"}, {"name": "HorizantalFlip", "p": 0.5}])
    msg = str(e.value)
    assert msg.startswith("data.augment.extra[1]: unknown albumentations transform 'HorizantalFlip'")
    assert "HorizontalFlip" in msg.split("close matches:")[1] and "\n" not in msg
    with pytest.raises(UserError, match=r"extra\[0\] \(HorizontalFlip\): .*'foo'"):
        AugmentConfig(extra=[{"name": "HorizontalFlip", "foo": 1}])  # a misspelt argument
    with pytest.raises(UserError, match=r"extra\[0\]\.transforms\[1\]: unknown .*'Blurr'"):
        AugmentConfig(extra=[{"name": "OneOf", "transforms": [{"name": "Blur"}, {"name": "Blurr"}]}])
    with pytest.raises(ValueError, match="extra_mode"):
        AugmentConfig(extra_mode="before")


SEPIA = """
import numpy as np
import albumentations as A


class Sepia(A.ImageOnlyTransform):
    def apply(self, img, **params):
        grey = img.mean(-1, keepdims=True)
        return np.clip(grey * np.array([1.07, 0.74, 0.43]), 0, 255).astype(img.dtype)


class NotATransform:
    pass
"""


def test_a_users_own_transform_by_import_path(tmp_path, monkeypatch):
    """``name: my_augment.Sepia`` builds the user's albumentations subclass, with the same box
    handling; a bad path or a class that is no transform is one line naming the entry."""
    (tmp_path / "my_augment.py").write_text(SEPIA)
    monkeypatch.syspath_prepend(str(tmp_path))
    img = _drawn()
    out, boxes, labels = apply_pipeline(build_pipeline([{"name": "my_augment.Sepia", "p": 1}]), img, BOXES,
                                        np.arange(3), np.random.default_rng(0))
    assert not np.array_equal(out, img) and np.ptp(out[..., 0].astype(int) - out[..., 2]) > 0  # tinted
    np.testing.assert_array_equal(boxes, BOXES)
    assert labels.tolist() == [0, 1, 2]
    with pytest.raises(UserError, match=r"^data\.augment\.extra\[0\]: cannot import 'no_such_module' .*PYTHONPATH$"):
        build_pipeline([{"name": "no_such_module.Sepia"}])
    with pytest.raises(UserError, match=r"^data\.augment\.extra\[0\]: module 'my_augment' has no 'Sepya'$"):
        build_pipeline([{"name": "my_augment.Sepya"}])
    with pytest.raises(UserError, match="'my_augment.NotATransform' is not an albumentations transform class"):
        build_pipeline([{"name": "my_augment.NotATransform"}])


def test_cli_names_a_bad_transform_in_one_line(capsys):
    assert main(["fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"),
                 "--data.augment.extra=[{name: RandomBrightnesContrast}]", "--trainer.max_epochs=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after Lightning's "Seed set" line
    assert err.startswith("detectkit fit: error: data.augment.extra[0]: unknown albumentations transform "
                          "'RandomBrightnesContrast'; close matches: RandomBrightnessContrast")


def test_extra_round_trips_through_lightning_cli(tmp_path, capsys):
    extra = [{"name": "HorizontalFlip", "p": 0.5},
             {"name": "OneOf", "transforms": [{"name": "Blur", "blur_limit": 3}, {"name": "MotionBlur"}], "p": 0.2},
             {"__class_fullname__": "RandomBrightnessContrast", "p": 0.3}]
    overlay = tmp_path / "extra.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"augment": {"extra": extra, "extra_mode": "replace"}}}))
    printed = []
    for config in ([str(ROOT / "experiments" / "quickstart.yaml"), str(overlay)], None):
        args = [a for c in (config or [str(tmp_path / "printed.yaml")]) for a in ("--config", c)]
        with pytest.raises(SystemExit):
            main(["fit", *args, "--print_config"])
        out = capsys.readouterr().out
        (tmp_path / "printed.yaml").write_text(out)
        printed.append(yaml.safe_load(out))
    augment = printed[0]["data"]["init_args"]["augment"]
    assert augment["extra"] == extra and augment["extra_mode"] == "replace"
    assert printed[1] == printed[0]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synth"), SyntheticConfig(train_images=6, val_images=2,
                                                                                 size=64, seed=5))


def _sample(root, index: int, **augment):
    ds = DetectionDataset(open_dataset(root).load("train"), 64, train=True, augment=AugmentConfig(**augment), seed=2)
    return ds[index]


def test_dataset_runs_extra_after_or_instead_of_the_builtin_pipeline(synth):
    plain = {"mixup_prob": 0.0, "hsv_prob": 0.0}
    base = _sample(synth, 1, **plain)
    # after: a pixel-only transform changes pixels, never the built-in pipeline's boxes
    bright = _sample(synth, 1, **plain, extra=[{"name": "RandomBrightnessContrast", "p": 1}])
    assert bright["image"].shape == base["image"].shape == (3, 64, 64)
    assert not bright["image"].equal(base["image"])
    assert bright["boxes"].equal(base["boxes"]) and bright["labels"].equal(base["labels"])
    # replace: only the letterbox and the user pipeline (a sure flip) run
    none = _sample(synth, 1, **plain, extra=[{"name": "HorizontalFlip", "p": 0}], extra_mode="replace")
    flip = _sample(synth, 1, **plain, extra=[{"name": "HorizontalFlip", "p": 1}], extra_mode="replace")
    assert flip["image"].equal(none["image"].flip(-1))
    b = none["boxes"]
    np.testing.assert_allclose(flip["boxes"].numpy(), np.stack([64 - b[:, 2], b[:, 1], 64 - b[:, 0], b[:, 3]], 1),
                               atol=1e-4)
    # a transform that changes the size is brought back to the training size
    crop = _sample(synth, 1, **plain, extra=[{"name": "RandomCrop", "height": 40, "width": 48, "p": 1}])
    assert crop["image"].shape == (3, 64, 64)


def test_a_fresh_pipeline_gives_the_same_samples(synth):
    """Each loader worker builds its own pipeline; its draws come from (seed, epoch, index), so a
    sample does not depend on which process made it or what it made before."""
    augment = AugmentConfig(extra=[{"name": "Affine", "rotate": [-30, 30], "p": 0.5},
                                   {"name": "RandomBrightnessContrast", "p": 0.5}])
    ds = DetectionDataset(open_dataset(synth).load("train"), 64, train=True, augment=augment, seed=2)
    first = [ds[i] for i in range(4)]
    fresh = DetectionDataset(open_dataset(synth).load("train"), 64, train=True, augment=augment, seed=2)
    for i, sample in reversed(list(enumerate(first))):
        again = fresh[i]
        assert again["image"].equal(sample["image"]) and again["boxes"].equal(sample["boxes"])


def test_fast_path_never_imports_albumentations(synth):
    code = ("import sys\n"
            "from detectkit.data.dataset import DetectionDataset\n"
            "from detectkit.data.formats import open_dataset\n"
            f"ds = DetectionDataset(open_dataset({str(synth)!r}).load('train'), 64, train=True)\n"
            "ds[0]\n"
            "assert 'albumentations' not in sys.modules, 'albumentations imported'\n")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
