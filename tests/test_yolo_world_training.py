"""YOLO-World in DetectionModule: class-name prompts at setup, prompt tuning, the recipes' YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from detectkit.data import AugmentConfig, LoaderConfig
from detectkit.data.synthetic import SyntheticConfig, synthetic_dataset
from detectkit.models.yolo_world.text import CLIPTextEncoder, EmbeddingsFileEncoder, TextEncoderUnavailable
from detectkit.modules.detector import DetectionModule, param_groups

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
NAMES = ["rectangle", "ellipse", "triangle"]


def _byte_chars() -> list[str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random 2-layer CLIP text tower (512-d projection) with a byte-level BPE vocabulary."""
    src = tmp_path_factory.mktemp("tok")
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (src / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (src / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(src))
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=512, bos_token_id=len(vocab) - 2,
        eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_clip")
    transformers.CLIPTextModelWithProjection(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory) -> Path:
    cfg = SyntheticConfig(train_images=2, val_images=1, size=96, max_objects=2, object_size=(0.3, 0.5))
    return synthetic_dataset(cfg, tmp_path_factory.mktemp("syn"))


@pytest.fixture(scope="module")
def batch(syn_root: Path) -> dict:
    """Two generated 96 px images as a training batch of the shared data pipeline."""
    from detectkit.data import DetectionDataModule

    dm = DetectionDataModule(train=f"{syn_root}/train", image_size=96,
                             loader=LoaderConfig(batch_size=2, num_workers=0),
                             augment=AugmentConfig(mixup_prob=0.0, translate=0.0, scale=(1.0, 1.0), hsv_prob=0.0, flip_prob=0.0))  # fmt: skip
    b = next(iter(dm.train_dataloader()))
    b["images"] = b["images"].float() / 255
    return b


def test_class_names_become_the_vocabulary(tiny_clip: Path, tmp_path: Path, monkeypatch) -> None:
    module = DetectionModule("yolo_world_v2_s", num_classes=3, class_names=NAMES, text_encoder=str(tiny_clip))
    assert module.world is not None and module.model.num_classes == 3
    module.setup("fit")
    expected = CLIPTextEncoder(tiny_clip).encode(NAMES)
    torch.testing.assert_close(module.model.txt_feats, expected)
    assert module.model.class_names == NAMES and module.criterion.num_classes == 3

    # a restored module keeps its vocabulary: setup does not need (or call) the encoder again
    state = module.state_dict()
    restored = DetectionModule(
        "yolo_world_v2_s", num_classes=3, class_names=NAMES, text_encoder=str(tmp_path / "gone")
    )
    restored.load_state_dict(state)
    restored.setup("validate")
    torch.testing.assert_close(restored.model.txt_feats, expected)
    # EMA checkpoints hold the average of a copy made before setup: its extra state is empty
    state["world._extra_state"] = {"vocabulary": None}
    restored = DetectionModule(
        "yolo_world_v2_s", num_classes=3, class_names=NAMES, text_encoder=str(tmp_path / "gone")
    )
    restored.load_state_dict(state)
    restored.setup("fit")
    torch.testing.assert_close(restored.model.txt_feats, expected)

    # a pretrained-size vocabulary (80) is resized to the data's classes, then encoded from a file
    path = tmp_path / "emb.pt"
    torch.save({n: torch.randn(512) for n in NAMES}, path)
    other = DetectionModule("yolo_world_v2_s", class_names=NAMES, text_encoder=str(path))
    assert other.num_classes == 3
    other.setup("fit")
    torch.testing.assert_close(other.model.txt_feats, EmbeddingsFileEncoder(path).encode(NAMES))

    # no encoder anywhere: a clear error, never placeholder prompts
    monkeypatch.setenv("DETECTKIT_CLIP", str(tmp_path / "no_clip_here"))
    bare = DetectionModule("yolo_world_v2_s", num_classes=3, class_names=NAMES)
    with pytest.raises(TextEncoderUnavailable, match="model.text_encoder"):
        bare.setup("fit")
    with pytest.raises(ValueError, match="YOLO-World options"):
        DetectionModule("yolo_nas_s", num_classes=3, text_encoder=str(path))


def test_prompt_tuning_changes_only_the_embeddings(tmp_path: Path, batch: dict) -> None:
    torch.manual_seed(0)
    path = tmp_path / "emb.pt"
    torch.save({n: torch.randn(512) for n in NAMES}, path)
    module = DetectionModule(
        "yolo_world_v2_s", num_classes=3, class_names=NAMES, text_encoder=str(path), prompt_tuning=True
    )
    module.setup("fit")
    module.train()
    model = module.model
    assert isinstance(model.txt_feats, nn.Parameter)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["txt_feats"]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)  # frozen statistics
    groups = param_groups(model, 0.0)
    assert [p for g in groups for p in g["params"]] == [model.txt_feats]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([model.txt_feats], lr=1e-2)
    losses = []
    for _ in range(4):
        loss, _ = module.compute_loss(model(batch["images"]), batch["targets"], 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["txt_feats"], changed

    module.on_fit_end()  # back to an ordinary vocabulary buffer: set_classes works again
    assert "txt_feats" in dict(model.named_buffers()) and not list(model.parameters())[0].requires_grad
    model.set_text_embeddings(EmbeddingsFileEncoder(path).encode(NAMES), NAMES)


@pytest.mark.parametrize("name", ["yolo_world_finetune", "yolo_world_prompt_tuning", "yolo_world_grounding"])
def test_recipes_parse_through_the_cli(name: str, tmp_path: Path, syn_root: Path) -> None:
    from detectkit.cli import DetectkitCLI

    odvg = tmp_path / "train.jsonl"
    instances = [{"bbox": [1, 1, 5, 5], "category": "dog"}, {"bbox": [2, 2, 8, 8], "category": "red ball"}]
    odvg.write_text(
        json.dumps({"filename": "a.jpg", "height": 9, "width": 9, "detection": {"instances": instances}})
    )
    overrides = {
        "yolo_world_finetune": ["--data.synthetic.train_images", "4", "--data.synthetic.val_images", "2"],
        "yolo_world_prompt_tuning": ["--model.checkpoint", "null", "--data.data_dir", str(syn_root)],
        "yolo_world_grounding": ["--data.init_args.odvg", str(odvg), "--data.init_args.val", "null"],
    }[name]
    args = ["--config", str(ROOT / "experiments" / f"{name}.yaml"), *overrides]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    cli = DetectkitCLI(args=args, run=False)  # the plain CLI: recipes may name their DataModule class
    assert cli.model.world is not None and cli.model.hparams.model == "yolo_world_v2_s"
    assert cli.model.num_classes == cli.datamodule.num_classes
    assert cli.model.world.prompt_tuning == (name == "yolo_world_prompt_tuning")
    if name == "yolo_world_grounding":
        assert type(cli.datamodule).__name__ == "GroundingDataModule" and cli.datamodule.class_names == [
            "dog",
            "red ball",
        ]
