"""Tiny real training setups for the module tests: generated data, yolo_nas_s, a few steps."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from detectkit.data import AugmentConfig, DetectionDataModule, LoaderConfig, SyntheticConfig

NO_AUGMENT = AugmentConfig(mixup_prob=0.0, translate=0.0, scale=(1.0, 1.0), hsv_prob=0.0, flip_prob=0.0)


def tiny_data(tmp: Path, size: int = 64, n_train: int = 4, n_val: int = 2, batch_size: int = 2, **kw) -> DetectionDataModule:
    cfg = SyntheticConfig(
        train_images=n_train, val_images=n_val, size=size, num_classes=2, max_objects=2,
        object_size=(0.3, 0.6), small_fraction=0.0, texture=0.2,
    )
    return DetectionDataModule(
        image_size=size, loader=LoaderConfig(batch_size=batch_size, num_workers=0), synthetic=cfg,
        cache_dir=str(tmp / "data"), **{"augment": NO_AUGMENT, **kw},
    )


def trainer(tmp: Path, callbacks=(), **kw) -> pl.Trainer:
    args = dict(
        default_root_dir=str(tmp), accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    args.update(kw)
    return pl.Trainer(callbacks=list(callbacks), **args)


def float_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}
