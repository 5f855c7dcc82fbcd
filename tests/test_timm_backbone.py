"""timm backbones under the YOLO-NAS neck and heads: each family builds, trains a step, exports to
ONNX (checked in onnxruntime) and is rebuilt by ``detectkit.load`` from its checkpoint record.
Random init only (nothing is downloaded), 64 px images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import detectkit
from detectkit.checkpoint import CheckpointError, save_weights
from detectkit.errors import UserError
from detectkit.extras import missing_extra_message
from detectkit.losses import build_loss
from detectkit.models.timm_backbone import pick_out_indices

pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[1]

# ResNet, EfficientNet, ConvNeXt and a ViT-style hybrid (EfficientViT's linear attention), the
# families whose feature maps sit at strides 4/8/16/32 in different stage layouts
FAMILIES = ["resnet18", "efficientnet_b0", "convnext_atto", "efficientvit_b0"]
TARGETS = torch.tensor([[0, 1, 4.0, 6.0, 40.0, 30.0], [1, 0, 20.0, 18.0, 60.0, 62.0], [1, 2, 2.0, 30.0, 24.0, 50.0]])


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_exports_and_reloads(family, tmp_path):
    from detectkit.export.deploy import ExportConfig, export_detector

    torch.manual_seed(0)
    model = detectkit.create_model("yolo_nas_s", num_classes=3, backbone=f"timm/{family}")
    feats = model.forward_features(torch.rand(1, 3, 64, 64))
    assert [feats[k].shape[-1] for k in ("c2", "c3", "c4", "c5")] == [16, 8, 4, 2]
    assert [feats[k].shape[1] for k in ("c2", "c3", "c4", "c5")] == model.backbone.out_channels

    # one training step: the loss is finite and its gradient reaches (and moves) the timm weights
    model.train()
    loss_fn = build_loss(model.default_loss, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0)
    x = torch.rand(2, 3, 64, 64)
    first = next(p for p in model.backbone.body.parameters() if p.requires_grad).detach().clone()
    total, _ = loss_fn(model.head_forward(x), TARGETS, 2)
    total.backward()
    assert torch.isfinite(total) and total.item() > 0
    opt.step()
    assert not torch.equal(first, next(p for p in model.backbone.body.parameters() if p.requires_grad))

    # the record names the backbone, so detectkit.load rebuilds it and gets the same outputs
    model.eval()
    assert model.registry_kwargs == {"backbone": f"timm/{family}"}
    path = save_weights(model, tmp_path / "w.pt")
    back = detectkit.load(path)
    assert type(back.backbone) is type(model.backbone)
    probe = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref, got = model(probe), back(probe)
    torch.testing.assert_close(got, ref)

    # ONNX: export_detector runs the graph in onnxruntime and compares it with PyTorch
    res = export_detector(back.fuse(), tmp_path / f"{family}.onnx", ExportConfig(image_size=64))
    assert res.max_abs_error is not None and res.max_abs_error < 1e-3


def test_picks_the_deepest_map_at_each_stride():
    assert pick_out_indices([2, 4, 8, 16, 32], "r") == [1, 2, 3, 4]
    assert pick_out_indices([4, 4, 8, 16, 16, 32], "x") == [1, 2, 4, 5]
    with pytest.raises(UserError, match=r"'timm/vit' has feature maps at strides \[16, 16, 16\]; .* \[4, 8, 16, 32\]"):
        pick_out_indices([16, 16, 16], "timm/vit")


def test_bad_backbones_are_one_line_errors():
    with pytest.raises(UserError, match="timm has no model 'resnet81'. Did you mean 'resnet18'"):
        detectkit.create_model("yolo_nas_s", backbone="timm/resnet81")
    with pytest.raises(UserError, match="expected 'timm/<model name>'"):
        detectkit.create_model("yolo_nas_s", backbone="resnet18")
    with pytest.raises(UserError, match="only fit its own backbone"):
        detectkit.create_model("yolo_nas_s", backbone="timm/resnet18", pretrained="coco")
    missing = ModuleNotFoundError("No module named 'timm'", name="timm")
    assert missing_extra_message(missing, "a timm backbone").endswith("pip install 'detectkit[timm]'")


def test_a_plain_vit_is_refused_for_its_single_stride():
    with pytest.raises(UserError, match="strides"):
        detectkit.create_model("yolo_nas_s", backbone="timm/vit_tiny_patch16_224")


def test_custom_architecture_keeps_the_backbone_in_its_record(tmp_path):
    model = detectkit.create_model("yolo_nas_custom", num_classes=2, arch="yolo_nas_s", backbone="timm/resnet18")
    assert model.registry_kwargs["backbone"] == "timm/resnet18" and "arch" in model.registry_kwargs
    back = detectkit.load(save_weights(model.eval(), tmp_path / "c.pt"))
    assert back.backbone.out_channels == [64, 128, 256, 512]


def test_a_record_still_refuses_a_file_as_backbone(tmp_path):
    model = detectkit.create_model("yolo_nas_s", num_classes=2, backbone="timm/resnet18").eval()
    path = save_weights(model, tmp_path / "w.pt")
    obj = torch.load(path, weights_only=True)
    obj["detectkit"]["model_kwargs"]["backbone"] = "/tmp/evil.pth"
    from detectkit.checkpoint.record import seal

    torch.save(seal(obj), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="names a file"):
        detectkit.load(tmp_path / "evil.pt")


def test_freezing_the_backbone_freezes_the_whole_timm_network():
    from detectkit.modules.freeze import freeze_parameters, frozen_norms

    model = detectkit.create_model("yolo_nas_s", num_classes=2, backbone="timm/resnet18")
    frozen = set(freeze_parameters(model, ["backbone"]))
    assert frozen == {f"backbone.{n}" for n, _ in model.backbone.named_parameters()}
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone."))
    assert model.backbone.body.bn1 in frozen_norms(model)  # timm's BatchNorms keep their statistics


def readme_timm_yaml() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Any timm backbone", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return block


@pytest.mark.slow
def test_the_readme_recipe_trains_it_from_the_command_line(tmp_path, monkeypatch):
    """The README's YAML on top of the quickstart recipe trains; the checkpoint loads and predicts."""
    from detectkit.cli import main
    from detectkit.models.timm_backbone import TimmBackbone
    from detectkit.predict.results import Predictions

    example = tmp_path / "timm_backbone.yaml"
    example.write_text(readme_timm_yaml())
    monkeypatch.chdir(tmp_path)
    assert main([
        "fit", "--config", "quickstart", "--config", str(example),
        "--data.image_size=64", "--data.loader.batch_size=2", "--data.loader.num_workers=0",
        "--data.synthetic.train_images=4", "--data.synthetic.val_images=2", "--data.synthetic.size=64",
        f"--data.cache_dir={tmp_path / 'data'}", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
        "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
    ]) == 0
    model = detectkit.load(next(tmp_path.rglob("last.ckpt")))
    assert isinstance(model.backbone, TimmBackbone) and model.record["model_kwargs"] == {"backbone": "timm/resnet18"}
    assert isinstance(model.predict(np.zeros((64, 64, 3), np.uint8)), Predictions)
