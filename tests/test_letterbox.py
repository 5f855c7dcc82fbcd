"""The one letterbox: hand-checked sizes, pads and box mappings (super-gradients' conventions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detectkit.data.letterbox import LetterboxInfo, letterbox, letterbox_boxes, unletterbox_boxes


def _image(h: int, w: int) -> np.ndarray:
    img = np.full((h, w, 3), 200, np.uint8)
    img[..., 1] = 50
    return img


def test_predict_recipe_100x50_by_hand():
    # w=100, h=50: scale = min(636/50, 636/100) = 6.36 -> 318 x 636 content, pads 322 (161/161) and 4 (2/2).
    padded, info = letterbox(_image(50, 100), size=640, longest=636, center=True)
    assert padded.shape == (640, 640, 3) and padded.dtype == np.uint8
    assert info == LetterboxInfo(6.36, 2, 161, (50, 100), (640, 640), (318, 636))
    assert info.pad == (2, 161)
    assert (padded[161:479, 2:638] == [200, 50, 200]).all()
    assert (padded[:161] == 114).all() and (padded[479:] == 114).all()
    assert (padded[:, :2] == 114).all() and (padded[:, 638:] == 114).all()

    box = np.array([[30.0, 10.0, 60.0, 20.0]])
    fwd = letterbox_boxes(box, info)
    np.testing.assert_allclose(fwd, [[30 * 6.36 + 2, 10 * 6.36 + 161, 60 * 6.36 + 2, 20 * 6.36 + 161]], rtol=1e-6)
    np.testing.assert_allclose(fwd, [[192.8, 224.6, 383.6, 288.2]], rtol=1e-6)
    np.testing.assert_allclose(unletterbox_boxes(fwd, info), box, atol=1e-4)


def test_odd_padding_split_and_bottom_right():
    # h=10, w=7 into (20, 21): scale = min(20/10, 21/7) = 2 -> 20 x 14 content, 7 columns of padding.
    img = _image(10, 7)
    centred, info = letterbox(img, size=(20, 21), longest=None, center=True)
    assert (info.scale, info.pad_left, info.pad_top, info.resized_size) == (2.0, 3, 0, (20, 14))
    assert (centred[:, :3] == 114).all() and (centred[:, 17:] == 114).all()  # 3 left, 4 right
    assert (centred[:, 3:17] != 114).all()

    corner, info_br = letterbox(img, size=(20, 21), longest=None, center=False)
    assert (info_br.pad_left, info_br.pad_top) == (0, 0)
    assert (corner[:, :14] != 114).all() and (corner[:, 14:] == 114).all()
    box = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    np.testing.assert_allclose(letterbox_boxes(box, info), [[5.0, 4.0, 9.0, 8.0]])
    np.testing.assert_allclose(letterbox_boxes(box, info_br), [[2.0, 4.0, 6.0, 8.0]])


def test_scale_one_copies_pixels_exactly():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (318, 636, 3), dtype=np.uint8)
    padded, info = letterbox(img, size=640, longest=636)
    assert info.scale == 1.0 and info.pad == (2, 161)
    np.testing.assert_array_equal(padded[161:479, 2:638], img)


def test_rounding_round_vs_floor():
    # h=11, w=16 into 8: scale 0.5, 11*0.5 = 5.5 -> round (predict) 6, floor (SG training) 5.
    _, rounded = letterbox(_image(11, 16), size=8, longest=None, center=False)
    _, floored = letterbox(_image(11, 16), size=8, longest=None, center=False, rounding="floor")
    assert rounded.resized_size == (6, 8) and floored.resized_size == (5, 8)
    # Python round is half-to-even, as in super-gradients: 9*0.5 = 4.5 -> 4.
    _, even = letterbox(_image(9, 16), size=8, longest=None)
    assert even.resized_size == (4, 8) and even.pad_top == 2


def test_upscales_small_images_and_fits_longest_none():
    padded, info = letterbox(_image(20, 10), size=64, longest=None)
    assert info.scale == 3.2 and info.resized_size == (64, 32) and info.pad == (16, 0)
    assert padded.shape == (64, 64, 3)


def test_unletterbox_clips_to_original_image_and_handles_tensors():
    _, info = letterbox(_image(50, 100), size=640, longest=636)
    # A box reaching into the padding maps outside the original image and is clipped to it.
    boxes = torch.tensor([[0.0, 100.0, 639.0, 300.0], [192.8, 224.6, 383.6, 288.2]])
    back = unletterbox_boxes(boxes, info)
    assert isinstance(back, torch.Tensor)
    torch.testing.assert_close(back[0], torch.tensor([0.0, 0.0, 100.0, (300 - 161) / 6.36]))
    torch.testing.assert_close(back[1], torch.tensor([30.0, 10.0, 60.0, 20.0]), atol=1e-4, rtol=0)
    raw = unletterbox_boxes(boxes, info, clip=False)
    assert raw[0, 0] < 0 and raw[0, 2] > 100
    assert torch.equal(boxes[1], torch.tensor([192.8, 224.6, 383.6, 288.2]))  # input untouched


def test_grayscale_and_per_channel_pad_value():
    padded, _ = letterbox(np.zeros((4, 8), np.uint8), size=8, longest=None, pad_value=7)
    assert padded.shape == (8, 8) and (padded[:2] == 7).all() and (padded[2:6] == 0).all()
    padded, _ = letterbox(np.zeros((4, 8, 3), np.uint8), size=8, longest=None, pad_value=(1, 2, 3))
    assert (padded[0, 0] == [1, 2, 3]).all()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="HWC or HW numpy image"):
        letterbox([[1, 2]], size=8)
    with pytest.raises(ValueError, match="pad_value"):
        letterbox(_image(4, 8), size=8, pad_value=(1, 2))
    with pytest.raises(ValueError, match="rounding"):
        letterbox(_image(4, 8), size=8, rounding="ceil")
