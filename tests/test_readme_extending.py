"""The README's "Extending" example runs as written: the YAML block parses through LightningCLI on
top of the quickstart recipe and trains a step with its augmentations, freezing and lr groups."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
import yaml

from detectkit.checkpoint import read_checkpoint
from detectkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def extending_yaml() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Extending: your own augmentations, freezing", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return block


def test_readme_extending_example_trains_a_step(tmp_path, monkeypatch):
    example = tmp_path / "extending.yaml"
    example.write_text(extending_yaml())
    recipe = yaml.safe_load(example.read_text())
    assert recipe["model"]["freeze"] and recipe["data"]["augment"]["extra"]
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "quickstart", "--config", str(example),
                 "--data.image_size=64", "--data.loader.batch_size=2", "--data.loader.num_workers=0",
                 "--data.synthetic.train_images=2", "--data.synthetic.val_images=1", "--data.synthetic.size=64",
                 f"--data.cache_dir={tmp_path / 'data'}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                 "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1",
                 "--trainer.enable_progress_bar=false"]) == 0
    (ckpt_path,) = tmp_path.rglob("last.ckpt")
    ckpt = read_checkpoint(ckpt_path)
    hp = ckpt["hyper_parameters"]
    assert hp["freeze"] == recipe["model"]["freeze"] and hp["optim"]["lr_mult"] == recipe["model"]["optim"]["lr_mult"]
    assert ckpt["datamodule_hyper_parameters"]["augment"]["extra"] == recipe["data"]["augment"]["extra"]
    # the step trained the neck and left the frozen backbone as initialised (raw and EMA weights alike)
    raw, ema = ckpt["current_model_state"], ckpt["state_dict"]
    torch.manual_seed(0)  # the quickstart's seed_everything: the same initial weights
    from detectkit import create_model

    init = create_model("yolo_nas_s", num_classes=3).state_dict()
    backbone = [k for k in init if k.startswith("backbone.") and init[k].is_floating_point()]
    assert backbone and all(torch.equal(raw[f"model.{k}"], init[k]) and torch.equal(ema[f"model.{k}"], init[k])
                            for k in backbone)
    assert any(not torch.equal(raw[f"model.{k}"], init[k]) for k in init if k.startswith("neck."))
    (metrics,) = tmp_path.rglob("metrics.csv")
    row = next(r for r in csv.DictReader(metrics.open()) if r.get("train/lr_decay"))
    assert float(row["train/lr_neck/decay"]) == pytest.approx(0.5 * float(row["train/lr_decay"]))
