"""YOLO-World k-shot new classes: learnable embeddings appended to a fixed base vocabulary.

A base model (3 shape classes) gets 2 new classes through ``DetectionModule(new_classes=...)``
and a real Lightning fit; afterwards the base classes' boxes and scores on fixed images are the
base model's, with the base vocabulary and with base + new, and the checkpoint reloads with
``detectkit.load``. Prompts come from a ``.pt`` embeddings file (no CLIP download offline).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn

import detectkit
from detectkit.checkpoint import save_weights
from detectkit.data import AugmentConfig, DetectionDataModule, LoaderConfig
from detectkit.data.synthetic import SyntheticConfig, synthetic_class_names, synthetic_dataset
from detectkit.modules.detector import DetectionModule, param_groups

ROOT = Path(__file__).resolve().parents[1]
NAMES = synthetic_class_names(5)
BASE, NEW = NAMES[:3], NAMES[3:]


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> Path:
    gen = torch.Generator().manual_seed(1)  # seed 0 would reproduce the placeholder prompts
    path = tmp_path_factory.mktemp("emb") / "prompts.pt"
    torch.save({n: torch.randn(512, generator=gen) for n in NAMES}, path)
    return path


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory, embeddings: Path) -> Path:
    """A base-class YOLO-World whose text-guided neck matters: the random init is stressed as in
    test_yolo_world_vocab (there the prompts barely change the neck, so a leak would go unnoticed)."""
    torch.manual_seed(0)
    base = DetectionModule("yolo_world_v2_s", num_classes=3, class_names=BASE, text_encoder=str(embeddings))
    base.setup("fit")
    with torch.no_grad():
        for name, value in base.model.state_dict().items():
            if name.endswith("running_var"):
                value.mul_(0.25)
            if ".attn.gl." in name or (".attn.proj_conv." in name and name.endswith("weight")):
                value.mul_(16)
            if name.startswith("head.cv2.") and name.endswith(".2.weight"):
                value.mul_(16)
            if name.startswith("head.cv4.") and name.endswith((".bias", "logit_scale")) and ".norm." not in name:
                value.fill_(1.0 if name.endswith("logit_scale") else 0.0)
    return save_weights(base.model, tmp_path_factory.mktemp("base") / "base.pt")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(5))


def test_new_classes_learn_while_base_outputs_stay(tmp_path: Path, embeddings: Path, base_weights: Path, images) -> None:
    base = detectkit.load(base_weights)
    assert base.class_names == BASE
    with torch.no_grad():
        base_boxes, base_scores = base(images)

    module = DetectionModule(
        "yolo_world_v2_s", num_classes=5, class_names=NAMES, checkpoint=str(base_weights),
        text_encoder=str(embeddings), new_classes=NEW, optim={"lr": 0.05, "weight_decay": 0.05, "warmup_steps": 0},
    )  # fmt: skip
    model = module.model
    assert module.num_classes == 5 and module.world.base_classes == BASE
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["txt_feats"]
    groups = param_groups(model, 0.05)
    assert [(g["weight_decay"], g["params"]) for g in groups] == [(0.0, [model.txt_feats])]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)  # from the start: Lightning does not call train()

    # without the fixed neck guide the new prompts would move the base outputs (the guide is needed)
    with torch.no_grad():
        probe = model.txt_feats.detach().clone()
        guide, model.guide_feats = model.guide_feats, None
        leaked_boxes, _ = model.decode(model.head_forward(images, text=probe))  # modes left as they are
        model.guide_feats = guide
    assert (leaked_boxes - base_boxes).abs().max() > 1e-2

    data = synthetic_dataset(
        SyntheticConfig(num_classes=5, train_images=4, val_images=2, size=96, max_objects=3, object_size=(0.3, 0.5)),
        tmp_path / "syn",
    )
    dm = DetectionDataModule(
        data_dir=str(data), image_size=96, loader=LoaderConfig(batch_size=2, num_workers=0),
        augment=AugmentConfig(mosaic_prob=0.0, mixup_prob=0.0, hsv_prob=0.0, flip_prob=0.0),
    )  # fmt: skip
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path, enable_checkpointing=False,
    )  # fmt: skip
    module.setup("fit")
    encoded = model.txt_feats.detach().clone()
    torch.testing.assert_close(encoded[:3], base.txt_feats)  # the base rows are the base model's
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "kshot.ckpt"
    trainer.save_checkpoint(ckpt)

    module.train()
    assert not any(m.training for m in bns)  # train() keeps the frozen statistics too
    learned = model.txt_feats.detach()
    assert "txt_feats" in dict(model.named_buffers())  # an ordinary vocabulary buffer again after fit
    assert torch.equal(learned[:3], encoded[:3])  # base rows: no gradient, no weight decay
    assert (learned[3:] - encoded[3:]).abs().max() > 1e-3  # the new classes learned

    net = detectkit.load(ckpt)
    assert net.class_names == NAMES and net.num_classes == 5
    with torch.no_grad():
        boxes, scores = net(images)  # both vocabularies at once
        torch.testing.assert_close(boxes, base_boxes, rtol=0, atol=1e-4)
        torch.testing.assert_close(scores[..., :3], base_scores, rtol=0, atol=1e-6)
        assert scores.shape[-1] == 5 and not torch.allclose(scores[..., 3:], scores[..., 3:].flip(-1))
        only_new_boxes, only_new = net(images, text=net.txt_feats[3:])
        torch.testing.assert_close(only_new, scores[..., 3:], rtol=0, atol=1e-6)
        torch.testing.assert_close(only_new_boxes, base_boxes, rtol=0, atol=1e-4)
    # the base vocabulary alone: exactly the base model again, and predict() answers both ways
    image = (images[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    both = net.predict(image, conf=0.0)
    net.set_text_embeddings(net.txt_feats[:3].clone(), BASE)
    with torch.no_grad():
        b, s = net(images)
    torch.testing.assert_close(b, base_boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(s, base_scores, rtol=0, atol=1e-6)
    base_only = net.predict(image, conf=0.0)
    assert both is not None and base_only is not None
    # reparameterised (baked) for export: still the base model's answers for the base classes
    net.reparameterize()
    with torch.no_grad():
        b, s = net(images)
    torch.testing.assert_close(s, base_scores, rtol=0, atol=1e-4)


def test_new_classes_reject_bad_setups(embeddings: Path, base_weights: Path) -> None:
    with pytest.raises(ValueError, match="base classes then the new ones"):
        DetectionModule("yolo_world_v2_s", num_classes=5, class_names=NEW + BASE, checkpoint=str(base_weights),
                        text_encoder=str(embeddings), new_classes=NEW)  # fmt: skip
    with pytest.raises(ValueError, match="placeholder"):
        DetectionModule("yolo_world_v2_s", num_classes=5, class_names=NAMES, text_encoder=str(embeddings),
                        new_classes=NEW)  # fmt: skip
    with pytest.raises(ValueError, match="already in the base"):
        DetectionModule("yolo_world_v2_s", num_classes=4, class_names=[*BASE, BASE[0]], checkpoint=str(base_weights),
                        text_encoder=str(embeddings), new_classes=[BASE[0]])  # fmt: skip
    with pytest.raises(ValueError, match="new_classes is empty"):
        DetectionModule("yolo_world_v2_s", num_classes=3, class_names=BASE, checkpoint=str(base_weights),
                        text_encoder=str(embeddings), new_classes=[])  # fmt: skip
    with pytest.raises(ValueError, match="YOLO-World options"):
        DetectionModule("yolo_nas_s", num_classes=3, new_classes=NEW)


def test_kshot_recipe_parses_through_the_cli(tmp_path: Path, embeddings: Path, base_weights: Path) -> None:
    from detectkit.cli import DetectkitCLI

    data = synthetic_dataset(SyntheticConfig(num_classes=5, train_images=2, val_images=1, size=96), tmp_path / "syn")
    args = ["--config", str(ROOT / "experiments" / "yolo_world_kshot.yaml"), "--model.checkpoint", str(base_weights),
            "--model.text_encoder", str(embeddings), "--model.new_classes", str(NEW).replace("'", '"'),
            "--data.data_dir", str(data), "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]  # fmt: skip
    cli = DetectkitCLI(args=args, run=False)
    assert cli.model.world.new_classes == NEW and cli.model.class_names == NAMES
    assert cli.model.world.base_classes == BASE
