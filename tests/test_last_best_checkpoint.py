"""last.ckpt is the last epoch's model and best.ckpt the monitored best, in every recipe.

Lightning's monitored ``ModelCheckpoint(save_last=True)`` rewrites last.ckpt only on improvement:
after a fit whose last epoch is not its best, last.ckpt held an older epoch and no best.ckpt existed.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from detectkit.callbacks import LastCheckpoint
from detectkit.callbacks.checkpoints import assign_checkpoint_roles
from lightning.pytorch.callbacks import ModelCheckpoint

from detectkit.checkpoint import read_checkpoint
from detectkit.cli.lightning import TRAINER_DEFAULTS, resolve_ckpt_path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


class ScoredModule(pl.LightningModule):
    """Trains a linear layer; its validation reports a score chosen per epoch, so the test decides
    which epoch is the best (the checkpoint logic, not the model, is under test)."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.layer, self.scores = torch.nn.Linear(2, 1), scores

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/map_50", self.scores[self.current_epoch])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2)

    val_dataloader = train_dataloader


def _fit(root: Path, scores: list[float], callbacks: list) -> Path:  # noqa: ANN001
    trainer = pl.Trainer(default_root_dir=str(root), max_epochs=len(scores), accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=callbacks)
    trainer.fit(ScoredModule(scores))
    return root / "checkpoints"


def test_last_is_last_epoch_best_is_best(tmp_path: Path) -> None:
    # the finetune/laptop recipes' checkpoint: monitored, save_last, no filename
    monitored = ModelCheckpoint(monitor="val/map_50", mode="max", save_last=True)
    folder = _fit(tmp_path, [0.5, 0.2, 0.2], [monitored, LastCheckpoint()])
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert read_checkpoint(folder / "last.ckpt")["epoch"] == 2  # the third epoch (0-based in the file)
    assert read_checkpoint(folder / "best.ckpt")["epoch"] == 0
    assert resolve_ckpt_path("best", [tmp_path]) == str(folder / "best.ckpt")
    assert resolve_ckpt_path("last", [tmp_path]) == str(folder / "last.ckpt")


def test_unmonitored_recipe_checkpoint_keeps_writing_last(tmp_path: Path) -> None:
    """A recipe's own unmonitored save_last checkpoint (quickstart) stays the one last.ckpt writer."""
    own = ModelCheckpoint(save_last=True, save_top_k=1)
    folder = _fit(tmp_path, [0.1, 0.2], [own, LastCheckpoint()])
    assert read_checkpoint(folder / "last.ckpt")["epoch"] == 1
    assert not list(folder.glob("last-v*.ckpt"))  # no second writer of last.ckpt


def test_the_cli_adds_last_checkpoint() -> None:
    assert any(d.class_path == "detectkit.callbacks.LastCheckpoint" for d in TRAINER_DEFAULTS)


def _recipe_checkpoints(path: Path) -> list[ModelCheckpoint]:
    cfg = yaml.safe_load(path.read_text()) or {}
    callbacks = (cfg.get("trainer") or {}).get("callbacks") or []
    return [ModelCheckpoint(**(cb.get("init_args") or {})) for cb in callbacks
            if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ModelCheckpoint")]


@pytest.mark.parametrize("recipe", sorted(EXPERIMENTS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_writes_last_each_epoch_and_best(recipe: Path) -> None:
    checkpoints = _recipe_checkpoints(recipe)
    last = LastCheckpoint()
    needed = assign_checkpoint_roles(checkpoints, last)
    own_last = [cb for cb in checkpoints if cb.save_last and cb.monitor is None and cb.save_top_k != 0]
    assert needed != bool(own_last)  # exactly one mechanism writes last.ckpt
    for cb in checkpoints:
        if cb.monitor is not None:
            assert not cb.save_last and cb.filename == "best", recipe.name
