"""``model.freeze`` and ``model.optim.lr_mult``: frozen parameters and statistics stay exactly as
loaded through training, EMA, resume and pruning; each optimizer group runs at its multiple of the lr."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from module_helpers import tiny_data, trainer

from detectkit.errors import UserError
from detectkit.modules import OptimConfig
from detectkit.modules.detector import DetectionModule, param_groups
from detectkit.modules.ema import ModelEMA


def _state(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def _module(dm, **kw) -> DetectionModule:
    torch.manual_seed(0)
    optim = OptimConfig(lr=1e-2, warmup_steps=2, lr_mult={"neck": 0.1})
    return DetectionModule("yolo_nas_s", num_classes=dm.num_classes, optim=optim, freeze=["backbone"], **kw)


class Lrs(pl.Callback):
    """Each step's lr per group name."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})


def test_frozen_backbone_and_its_statistics_stay_equal_lr_groups_follow_their_multiplier(tmp_path):
    dm = tiny_data(tmp_path)
    module = _module(dm)
    before = _state(module.model, "backbone.")
    neck = _state(module.model, "neck.")
    assert all(not p.requires_grad for n, p in module.model.named_parameters() if n.startswith("backbone."))
    ema, lrs = ModelEMA(), Lrs()
    trainer(tmp_path, [ema, lrs], max_epochs=2, limit_val_batches=0).fit(module, datamodule=dm)
    after = _state(module.model, "backbone.")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), \
        "a frozen parameter or BatchNorm statistic changed"
    assert any(not torch.equal(neck[k], v) for k, v in _state(module.model, "neck.").items())  # the rest trains
    averaged = _state(ema.averaged_module.model, "backbone.")
    assert all(torch.equal(before[k], averaged[k]) for k in before), "EMA moved a frozen entry"
    names = [g["name"] for g in module.trainer.optimizers[0].param_groups]
    assert names == ["decay", "no_decay", "neck/decay", "neck/no_decay"]
    frozen_ids = {id(p) for n, p in module.model.named_parameters() if n.startswith("backbone.")}
    assert not frozen_ids & {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert len(lrs.steps) == 4
    for step in lrs.steps:  # warm-up and cosine alike: the neck at a tenth of the rest
        assert step["neck/decay"] == pytest.approx(0.1 * step["decay"]) and step["no_decay"] == step["decay"]
    assert lrs.steps[0]["decay"] == pytest.approx(1e-6)  # warm-up start (warmup_initial_lr)
    assert lrs.steps[1]["decay"] == pytest.approx(1e-2) and lrs.steps[3]["decay"] < 1e-2  # then the cosine


def test_resume_keeps_freezing_and_groups(tmp_path):
    dm = tiny_data(tmp_path)
    module = _module(dm)
    before = _state(module.model, "backbone.")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer(tmp_path, [ModelEMA(), ckpt], max_epochs=1, limit_val_batches=0, enable_checkpointing=True).fit(
        module, datamodule=dm)
    first = module.trainer.optimizers[0].state_dict()
    resumed = _module(tiny_data(tmp_path))
    lrs = Lrs()
    t = trainer(tmp_path, [ModelEMA(), lrs], max_epochs=2, limit_val_batches=0)
    t.fit(resumed, datamodule=tiny_data(tmp_path), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert t.global_step == 4 and len(lrs.steps) == 2
    groups = t.optimizers[0].param_groups
    assert [g["name"] for g in groups] == [g["name"] for g in first["param_groups"]]
    assert groups[2]["lr"] == pytest.approx(0.1 * groups[0]["lr"])
    after = _state(resumed.model, "backbone.")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert resumed.hparams["freeze"] == ["backbone"] and resumed.hparams["optim"]["lr_mult"] == {"neck": 0.1}


def test_patterns_and_errors(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1))
    groups = param_groups(net, 0.1, lr=1.0, lr_mult={"2.*": 0.5, "2": 0.2, "1": 3.0})
    named = {g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in groups}
    # the first matching pattern wins ("2.*" before "2"); norm params never decay
    assert named == {"decay": (1.0, 0.1, 1), "no_decay": (1.0, 0.0, 1), "2.*/decay": (0.5, 0.1, 1),
                     "2.*/no_decay": (0.5, 0.0, 1), "1/no_decay": (3.0, 0.0, 2)}
    dm = tiny_data(tmp_path)
    with pytest.raises(UserError, match=r"model.freeze: 'backbon' matches no parameter .*backbone, .*neck"):
        DetectionModule("yolo_nas_s", num_classes=dm.num_classes, freeze=["backbon"])
    with pytest.raises(ValueError, match=r"lr_mult\['neck'\] must be > 0"):
        OptimConfig(lr_mult={"neck": 0})
    module = DetectionModule("yolo_nas_s", num_classes=dm.num_classes, freeze=["*.bn.*", "neck.neck1.*"])
    frozen = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    assert frozen and all(".bn." in n or n.startswith("neck.neck1.") for n in frozen)
    module.train()
    bns = [m for n, m in module.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training for m in bns if not any(p.requires_grad for p in m.parameters()))
    assert module.model.heads.training


def test_pruning_keeps_frozen_layers_whole_and_frozen(tmp_path):
    from detectkit.callbacks import StructuredPruning

    dm = tiny_data(tmp_path)
    module = _module(dm)
    module.model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        features = [f.clone() for f in module.model.backbone(x)]
    module.train()
    neck_shapes = {k: v.shape for k, v in module.model.neck.state_dict().items()}
    prune = StructuredPruning(target_macs_ratio=None, channel_sparsity=0.25, image_size=64, round_to=4)
    trainer(tmp_path, [prune, ModelEMA()], max_epochs=1, limit_val_batches=0).fit(module, datamodule=dm)
    assert {k: v.shape for k, v in module.model.neck.state_dict().items()} != neck_shapes  # the neck was pruned
    assert all(not p.requires_grad for n, p in module.model.named_parameters() if n.startswith("backbone."))
    module.model.eval()
    with torch.no_grad():  # fused for pruning, but the same function of the same frozen weights
        for a, b in zip(features, module.model.backbone(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
