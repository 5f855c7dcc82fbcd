"""Image reading: odd modes become 8-bit RGB; EXIF orientation applies to pixels AND boxes."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import write_image
from PIL import Image

from detectkit.data.formats import open_dataset
from detectkit.data.images import ImageReadError, image_size, read_image


def test_16bit_grayscale_rgba_palette(tmp_path):
    g16 = np.full((10, 12), 65535, np.uint16)
    g16[:, :6] = 257 * 100
    Image.fromarray(g16).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    assert img.dtype == np.uint8 and img.shape == (10, 12, 3)
    assert img[0, 0].tolist() == [100] * 3 and img[0, -1].tolist() == [255] * 3

    Image.fromarray(np.full((8, 9), 77, np.uint8), "L").save(tmp_path / "gray.png")
    assert read_image(tmp_path / "gray.png")[0, 0].tolist() == [77] * 3

    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:3, ..., 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    assert out.shape == (6, 6, 3) and out[0, 0].tolist() == [200, 0, 0] and out[5, 5].tolist() == [114] * 3

    write_image(tmp_path / "p.png", 7, 5, mode="P")
    assert read_image(tmp_path / "p.png").shape == (5, 7, 3)


def test_exif_rotation_applies_to_size_pixels_and_yolo_boxes(tmp_path):
    # stored 40 wide x 20 high, left half white; EXIF 6 = display rotated 90 deg clockwise
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    root = tmp_path / "ds"
    (root / "train/images").mkdir(parents=True)
    (root / "train/labels").mkdir(parents=True)
    Image.fromarray(arr).save(root / "train/images/r.jpg", exif=exif.tobytes(), quality=100)
    assert image_size(root / "train/images/r.jpg") == (20, 40)  # displayed: 20 wide, 40 high
    shown = read_image(root / "train/images/r.jpg")
    assert shown.shape == (40, 20, 3)
    assert shown[:15].mean() > 200 and shown[25:].mean() < 50  # the white half is now on top
    # the annotation tool saw the displayed image: box over the top half, normalised to 20x40
    (root / "train/labels/r.txt").write_text("0 0.5 0.25 1.0 0.5\n")
    (root / "data.yaml").write_text("names: [thing]\ntrain: train/images\n")
    rec = open_dataset(root).load("train").records[0]
    assert (rec.width, rec.height) == (20, 40)
    np.testing.assert_allclose(rec.boxes[0], [0, 0, 20, 20], atol=1e-4)


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    with pytest.raises(ImageReadError, match="nope.jpg: image file not found"):
        read_image(tmp_path / "nope.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        read_image(tmp_path / "bad.jpg")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        image_size(tmp_path / "bad.jpg")
    # truncated: the header reads, decoding fails
    write_image(tmp_path / "good.jpg", 64, 64)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    assert image_size(tmp_path / "trunc.jpg") == (64, 64)
    with pytest.raises(ImageReadError, match="trunc.jpg: cannot decode"):
        read_image(tmp_path / "trunc.jpg")
