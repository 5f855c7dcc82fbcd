"""SG EMA as a WeightAveraging callback: decay ramp, BN buffers, validation on EMA, checkpoints, resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from module_helpers import float_state, tiny_data, trainer

from detectkit.modules import OptimConfig
from detectkit.modules.detector import DetectionModule
from detectkit.modules.ema import ModelEMA, ema_decay


def test_sg_decay_functions():
    assert ema_decay(0.9997, 1, 100, "threshold") == pytest.approx(2 / 11)
    assert ema_decay(0.9997, 10**6, 100, "threshold") == pytest.approx(0.9997)
    assert ema_decay(0.9, 50, 100, "exp", beta=15) == pytest.approx(0.9 * (1 - torch.exp(torch.tensor(-7.5)).item()))
    assert ema_decay(0.9, 3, 100, "constant") == 0.9
    with pytest.raises(ValueError):
        ModelEMA(decay_type="linear")


class Spy(pl.Callback):
    """Records raw weights after every step (after ModelEMA's update) and what validation sees."""

    def __init__(self):
        self.init, self.raw, self.val, self.after_val = None, [], None, None

    def on_train_start(self, trainer, pl_module):
        self.init = float_state(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.raw.append(float_state(pl_module.model))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.val is None:
            self.val = float_state(pl_module.model)

    def on_validation_end(self, trainer, pl_module):
        self.after_val = float_state(pl_module.model)


def _expected_ema(init, raws, decay=0.9997):
    ema = {k: v.clone() for k, v in init.items()}
    for step, raw in enumerate(raws, start=1):
        d = ema_decay(decay, step, 1, "threshold")
        for k in ema:
            ema[k] = ema[k] * d + raw[k] * (1 - d)
    return ema


def test_validation_runs_on_ema_weights_and_checkpoint_resumes(tmp_path):
    torch.manual_seed(0)
    dm = tiny_data(tmp_path)
    module = DetectionModule("yolo_nas_s", num_classes=dm.num_classes,
                             optim=OptimConfig(lr=1e-3, warmup_steps=0))
    ema, spy = ModelEMA(), Spy()
    ckpt = tmp_path / "ema.ckpt"

    class Save(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            trainer.save_checkpoint(ckpt)

    tr = trainer(tmp_path, [ema, spy, Save()], max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    tr.fit(module, dm)

    expected = _expected_ema(spy.init, spy.raw)
    keys = list(expected)
    assert any("running_mean" in k for k in keys)  # BN statistics are averaged too, as in SG
    for k in keys:
        torch.testing.assert_close(spy.val[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    changed = [k for k in keys if not torch.equal(spy.raw[-1][k], expected[k])]
    assert len(changed) > len(keys) // 2  # EMA != raw weights, so the comparison above means something
    for k in keys:  # after validation training continues from the raw weights
        torch.testing.assert_close(spy.after_val[k], spy.raw[-1][k], rtol=0, atol=0, msg=k)

    # checkpoint: state_dict = EMA, current_model_state = raw, n_averaged = 1 (init) + 2 updates
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    for k in keys:
        torch.testing.assert_close(saved["state_dict"][f"model.{k}"], expected[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved["current_model_state"][f"model.{k}"], spy.raw[-1][k], rtol=0, atol=0)
    assert int(saved["averaging_state"]["n_averaged"]) == 3

    # resume: raw weights come back for training, the EMA continues its ramp (step 3, 4)
    torch.manual_seed(1)
    module2 = DetectionModule("yolo_nas_s", num_classes=dm.num_classes,
                              optim=OptimConfig(lr=1e-3, warmup_steps=0))
    ema2, spy2 = ModelEMA(), Spy()
    tr2 = trainer(tmp_path, [ema2, spy2], max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    tr2.fit(module2, tiny_data(tmp_path), ckpt_path=str(ckpt))
    assert int(ema2._average_model.n_averaged) == 5
    ema_after = {k: expected[k].clone() for k in keys}
    for step, raw in enumerate(spy2.raw, start=3):
        d = ema_decay(0.9997, step, 1, "threshold")
        for k in keys:
            ema_after[k] = ema_after[k] * d + raw[k] * (1 - d)
    for k in keys:
        torch.testing.assert_close(spy2.val[k], ema_after[k], rtol=1e-5, atol=1e-6, msg=k)
