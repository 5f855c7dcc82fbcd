"""DetectionModule: num_classes wiring, optimizer groups, overfitting, checkpoint re-scoring, mAP glue."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from module_helpers import tiny_data, trainer

from detectkit.data import SyntheticConfig, generate_synthetic
from detectkit.modules import OptimConfig
from detectkit.modules.detector import DetectionModule
from detectkit.modules.metrics import build_map_metric, metric_inputs, summarize_map


def test_num_classes_reaches_model_loss_and_metric_names():
    module = DetectionModule("yolo_nas_s", num_classes=5, class_names=list("abcde"))
    assert module.num_classes == module.model.num_classes == module.criterion.num_classes == 5
    assert module.class_names == module.model.class_names == list("abcde")
    module.train()
    head = module.model(torch.rand(1, 3, 64, 64))
    assert head.cls_logits.shape[-1] == 5
    with pytest.raises(ValueError):
        DetectionModule("yolo_nas_s", num_classes=5, class_names=["only", "two"])


def test_optimizer_groups_and_schedule_on_the_detector(tmp_path):
    module = DetectionModule("yolo_nas_s", num_classes=2,
                             optim=OptimConfig(lr=1e-3, weight_decay=1e-5, warmup_steps=3))
    tr = trainer(tmp_path, max_steps=10)
    module.trainer = tr  # estimated_stepping_batches = max_steps
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == 1e-5 and groups["no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    bn = [m for m in module.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(id(p) in no_decay for m in bn for p in m.parameters())
    biases = [p for n, p in module.model.named_parameters() if n.endswith(".bias")]
    assert biases and all(id(p) in no_decay for p in biases)
    decay = {id(p) for p in groups["decay"]["params"]}
    assert decay == {id(p) for p in module.model.parameters()} - no_decay
    convs = [m.weight for m in module.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(id(w) in decay for w in convs)
    assert opt_cfg["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-6) and lrs[2] == pytest.approx(1e-3)
    # SG's cosine: 0.5 * (1 + cos(pi * t / (T + 1))) rescaled to end near final_lr_ratio
    t, t_max = 9 - 3, 10 - 3
    assert lrs[-1] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / (t_max + 1)))))


def test_metric_inputs_map_back_to_original_pixels():
    det = torch.tensor([[12.0, 22.0, 52.0, 62.0, 0.9, 1.0]])
    meta = {"scale": 2.0, "pad": (2, 2), "orig_size": (40, 40), "boxes": [[5.0, 10.0, 25.0, 30.0]], "labels": [1]}
    preds, targets = metric_inputs([det], [meta])
    torch.testing.assert_close(preds[0]["boxes"], torch.tensor([[5.0, 10.0, 25.0, 30.0]]))
    metric = build_map_metric()
    metric.update(preds, targets)
    summary = summarize_map(metric.compute(), ["zero", "one"])
    assert summary["map_50"] == pytest.approx(1.0) and summary["AP/one"] == pytest.approx(1.0)
    assert "AP/zero" not in summary  # absent from the ground truth


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """A few generated images, learnt by heart (training set = validation set, no augmentation)."""
    tmp = tmp_path_factory.mktemp("overfit")
    torch.manual_seed(0)
    cfg = SyntheticConfig(train_images=4, val_images=0, size=64, num_classes=2, max_objects=2,
                          object_size=(0.35, 0.6), small_fraction=0.0, texture=0.2)
    root = generate_synthetic(tmp / "data", cfg)
    dm = tiny_data(tmp, size=64, batch_size=4, train=str(root / "train"), val=str(root / "train"))
    module = DetectionModule("yolo_nas_s", num_classes=dm.num_classes, class_names=dm.class_names,
                             optim=OptimConfig(lr=3e-3, warmup_steps=5))
    # SG's BN momentum (0.03) needs 100+ steps before eval-mode statistics catch up with the
    # weights (measured: map_50 0.05 after 50 steps, 0.53 after 150); 0.3 overfits in ~40 steps.
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.3
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True, save_top_k=0)
    tr = trainer(tmp, [ckpt], max_epochs=50, check_val_every_n_epoch=50, enable_checkpointing=True)
    tr.fit(module, dm)
    metrics = {k: float(v) for k, v in tr.callback_metrics.items() if k.startswith("val/")}
    return dm, module, ckpt.last_model_path, metrics, tmp


def test_overfits_a_few_generated_images(overfit_run):
    dm, module, _, metrics, _ = overfit_run
    assert metrics["val/map_50"] >= 0.9, metrics
    for name in dm.class_names:  # per-class AP logged under the class names
        assert f"val/AP/{name}" in metrics


def test_validate_rescores_the_checkpoint_identically(overfit_run):
    dm, _, ckpt, metrics, tmp = overfit_run
    fresh = DetectionModule.load_from_checkpoint(ckpt)
    results = trainer(tmp).validate(fresh, datamodule=dm, verbose=False)[0]
    assert results["val/map_50"] == pytest.approx(metrics["val/map_50"], abs=1e-6)
    assert results["val/map"] == pytest.approx(metrics["val/map"], abs=1e-6)


def test_bf16_autocast_training_keeps_the_loss_in_fp32(tmp_path):
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["loss"] = outputs["loss"].dtype
            seen["image_losses"] = outputs["image_losses"].shape

    module = DetectionModule("yolo_nas_s", num_classes=2, optim=OptimConfig(warmup_steps=0))
    tr = trainer(tmp_path, [Probe()], max_steps=1, precision="bf16-mixed", limit_val_batches=0)
    tr.fit(module, tiny_data(tmp_path))
    assert seen["loss"] == torch.float32
    assert seen["image_losses"] == (2,)  # per-image losses for the curriculum
