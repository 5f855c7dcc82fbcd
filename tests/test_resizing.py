"""Progressive resizing: schedules on hand-checked values, the batch resize, the callback state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from detectkit.data.resizing import (
    ProgressiveResizing,
    SizeSchedule,
    derive_seed,
    epoch_image_size,
    jitter_sizes,
    resize_batch,
    schedule_progress,
    step_image_size,
)


def test_linear_schedule_ramps_between_epochs():
    s = SizeSchedule(start_size=320, end_size=640, start_epoch=2, end_epoch=6)
    # 320 + 320 * (e-2)/4 = 320, 400, 480, 560, 640; to multiples of 32 rounding half up: 400 -> 416, 560 -> 576
    assert [epoch_image_size(e, s) for e in range(9)] == [320, 320, 320, 416, 480, 576, 640, 640, 640]


def test_step_and_constant_schedules():
    s = SizeSchedule(start_size=256, mode="step", milestones={"3": 416, 0: 320, 6: 640})
    assert [epoch_image_size(e, s) for e in range(8)] == [320, 320, 320, 416, 416, 416, 640, 640]
    c = SizeSchedule(end_size=512, mode="constant")
    assert {epoch_image_size(e, c) for e in range(5)} == {512}


def test_schedule_rejects_bad_sizes():
    with pytest.raises(ValueError):
        SizeSchedule(start_size=300)
    with pytest.raises(ValueError):
        SizeSchedule(mode="step")
    with pytest.raises(ValueError):
        SizeSchedule(start_epoch=5, end_epoch=2)


def test_schedule_progress():
    s = SizeSchedule(start_size=320, end_size=640, start_epoch=0, end_epoch=4)
    assert [schedule_progress(e, s) for e in range(5)] == [0.0, 0.3, 0.5, 0.8, 1.0]


def test_jitter_candidates():
    assert jitter_sizes(640, 0.0) == [640]
    # [480, 800] in steps of 32
    assert jitter_sizes(640, 0.25) == list(range(480, 801, 32))
    # [144, 176] -> multiples of 32 inside: 160
    assert jitter_sizes(160, 0.1) == [160]
    assert jitter_sizes(64, 0.9, min_size=64) == [64, 96]


def test_step_size_is_pure_and_varies():
    s = SizeSchedule(start_size=640, end_size=640, jitter=0.5)
    sizes = [step_image_size(7, 1, k, s) for k in range(200)]
    assert sizes == [step_image_size(7, 1, k, s) for k in range(200)]
    assert all(320 <= x <= 960 and x % 32 == 0 for x in sizes)
    assert len(set(sizes)) > 5
    # a different seed gives a different sequence
    assert sizes != [step_image_size(8, 1, k, s) for k in range(200)]
    # the global RNGs play no part
    torch.manual_seed(0)
    a = step_image_size(7, 3, 5, s)
    torch.manual_seed(1)
    assert step_image_size(7, 3, 5, s) == a


def test_derive_seed_is_pinned():
    # blake2b of the packed ints: the same in every process and Python version (hash() is not)
    assert derive_seed(1, 2, 3) == 6520558355739401531
    assert derive_seed(1, 2, 3) != derive_seed(1, 3, 2)
    assert 0 <= derive_seed(-5, 2**40) < 2**63


def test_resize_batch_square_scales_boxes_and_meta():
    images = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 1, 8.0, 16.0, 32.0, 48.0], [1, 0, 0.0, 0.0, 64.0, 64.0]])
    meta = [{"scale": 0.5, "pad": (0, 8), "orig_size": (96, 128)}, {"scale": 1.0, "pad": (0, 0)}]
    out, t, m = resize_batch(images, targets, meta, 32)
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(t[:, :2], targets[:, :2])
    assert t[:, 2:].tolist() == [[4.0, 8.0, 16.0, 24.0], [0.0, 0.0, 32.0, 32.0]]
    assert m[0]["scale"] == 0.25 and m[0]["pad"] == (0.0, 4.0) and m[0]["orig_size"] == (96, 128)
    # inputs untouched
    assert meta[0]["scale"] == 0.5 and targets[0, 2] == 8.0
    # a constant image stays constant (no border artefacts)
    flat = torch.full((1, 3, 64, 64), 0.25)
    assert torch.allclose(resize_batch(flat, targets[:0], None, 96)[0], torch.full((1, 3, 96, 96), 0.25))


def test_resize_batch_maps_original_pixels_back():
    """A point in the original image lands on the same content before and after the resize."""
    images = torch.zeros(1, 3, 64, 96)
    images[0, :, 20:40, 30:60] = 1.0  # a bright block: input pixels x 30..60, y 20..40
    meta = [{"scale": 2.0, "pad": (10, 4)}]  # original block: x 10..25, y 8..18
    out, t, m = resize_batch(images, torch.zeros(0, 6), meta, 192)
    s, (left, top) = m[0]["scale"], m[0]["pad"]
    assert out.shape == (1, 3, 128, 192) and s == 4.0
    x1, y1, x2, y2 = (10 * s + left, 8 * s + top, 25 * s + left, 18 * s + top)
    assert (x1, y1, x2, y2) == (60.0, 40.0, 120.0, 80.0)
    assert out[0, 0, int(y1) + 2 : int(y2) - 2, int(x1) + 2 : int(x2) - 2].min() > 0.99
    assert out[0, 0, : int(y1) - 2].max() < 0.01


def test_resize_batch_pads_rectangular_to_stride():
    images = torch.rand(1, 3, 64, 96)
    out, _, m = resize_batch(
        images, torch.zeros(0, 6), [{"scale": 1.0, "pad": (0, 0), "input_size": (64, 96)}], 160
    )
    # s = 160/96; 64*s = 106.67 -> 107, padded to 128 at the bottom
    assert out.shape == (1, 3, 128, 160)
    assert m[0]["input_size"] == (128, 160)
    assert torch.allclose(out[0, :, 107:], torch.full_like(out[0, :, 107:], 114 / 255))


class _FakeTrainer:
    def __init__(self, epoch, datamodule=None):
        self.current_epoch = epoch
        self.datamodule = datamodule


class _Recorder:
    def __init__(self):
        self.logged = []

    def log(self, name, value, **kwargs):
        self.logged.append((name, value))


def _batch(n=2, size=64):
    return {
        "images": torch.rand(n, 3, size, size),
        "targets": torch.tensor([[0, 0, 8.0, 8.0, 32.0, 32.0]]),
        "meta": [{"scale": 1.0, "pad": (0, 0)} for _ in range(n)],
    }


def test_callback_resizes_batch_in_place_and_logs():
    cb = ProgressiveResizing(start_size=32, end_size=128, start_epoch=0, end_epoch=2, seed=3)
    module = _Recorder()
    batch = _batch()
    cb.on_train_batch_start(_FakeTrainer(1), module, batch, 0)
    assert batch["images"].shape[-1] == 96 == cb.last_size
    assert batch["targets"][0, 2:].tolist() == [12.0, 12.0, 48.0, 48.0]
    assert batch["meta"][0]["scale"] == 1.5
    assert module.logged == [("train/image_size", 96.0)]


def test_callback_sets_magnitude_and_loader_size_per_epoch():
    class Train:
        size = None

        def set_image_size(self, size):
            self.size = size

    class DM:
        magnitude = None

        def __init__(self):
            self.datasets = {"train": Train()}

        def set_magnitude(self, value):
            self.magnitude = value

    dm = DM()
    cb = ProgressiveResizing(start_size=320, end_size=640, start_epoch=0, end_epoch=4, magnitude=(0.0, 1.0))
    cb.on_fit_start(_FakeTrainer(0, dm), None)
    assert (dm.magnitude, dm.datasets["train"].size) == (0.0, 320)
    cb.on_train_epoch_start(_FakeTrainer(2, dm), None)
    assert (dm.magnitude, dm.datasets["train"].size) == (pytest.approx(0.5), 480)
    cb.on_train_epoch_start(_FakeTrainer(9, dm), None)
    assert (dm.magnitude, dm.datasets["train"].size) == (1.0, 640)
    off = ProgressiveResizing(start_size=320, end_size=640, end_epoch=4, resize_in_loader=False)
    dm = DM()
    off.on_train_epoch_start(_FakeTrainer(2, dm), None)
    assert (dm.magnitude, dm.datasets["train"].size) == (None, None)


def test_callback_state_round_trip_continues_sequence():
    kwargs = dict(start_size=320, end_size=640, start_epoch=0, end_epoch=3, jitter=0.3, seed=11)
    full = ProgressiveResizing(**kwargs)
    expected = [full.size_for(e, k) for e in range(4) for k in range(5)]

    first = ProgressiveResizing(**kwargs)
    first.on_train_batch_start(_FakeTrainer(1), _Recorder(), _batch(1, 640), 2)
    state = first.state_dict()
    resumed = ProgressiveResizing()  # defaults differ: the checkpoint must win
    resumed.load_state_dict(state)
    assert (resumed.last_epoch, resumed.last_step) == (1, 2)
    assert [resumed.size_for(e, k) for e in range(4) for k in range(5)] == expected


def test_resumed_state_applies_the_next_epoch_before_the_loader_starts():
    """Lightning restores callbacks before on_fit_start but the loop counter only after it."""

    class Train:
        size = None

        def set_image_size(self, size):
            self.size = size

    dm = SimpleNamespace(datasets={"train": Train()})
    kwargs = dict(start_size=64, end_size=256, start_epoch=0, end_epoch=3)
    cb = ProgressiveResizing(**kwargs)
    trainer = SimpleNamespace(current_epoch=1, num_training_batches=4, datamodule=dm)
    cb.on_train_batch_end(trainer, None, None, None, 1)
    mid = cb.state_dict()
    cb.on_train_batch_end(trainer, None, None, None, 3)  # the epoch's last batch
    end = cb.state_dict()
    assert (mid["next_epoch"], end["next_epoch"]) == (1, 2)
    for state, size in [(mid, 128), (end, 192)]:
        fresh = ProgressiveResizing(**kwargs)
        fresh.load_state_dict(state)
        fresh.on_fit_start(SimpleNamespace(current_epoch=0, datamodule=dm), None)
        assert dm.datasets["train"].size == size


def test_experiment_recipe_builds_the_callback():
    import importlib
    from pathlib import Path

    import yaml

    path = Path(__file__).parents[1] / "experiments" / "yolo_nas_s_progressive.yaml"
    (entry,) = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
    module, name = entry["class_path"].rsplit(".", 1)
    cb = getattr(importlib.import_module(module), name)(**entry["init_args"])
    assert isinstance(cb, ProgressiveResizing)
    assert [epoch_image_size(e, cb.schedule) for e in (0, 10, 20, 29)] == [320, 480, 640, 640]
    assert cb.magnitude_for(10) == pytest.approx(0.65)
