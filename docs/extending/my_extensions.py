"""A researcher's own pieces, in their own file next to the recipe: an albumentations augmentation and a
Lightning callback. ``extending.yaml`` names them by import path (``my_extensions.Sepia``,
``my_extensions.TrainableSummary``); the ``detectkit`` command imports them from the working folder."""

from __future__ import annotations

import albumentations as A
import lightning.pytorch as pl
import numpy as np


class Sepia(A.ImageOnlyTransform):
    """A colour-only augmentation: boxes pass through unchanged (albumentations knows it touches no
    geometry because it subclasses ``ImageOnlyTransform``)."""

    def __init__(self, strength: float = 1.0, p: float = 0.5):
        super().__init__(p=p)
        self.strength = strength

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        grey = img.astype(np.float32).mean(-1, keepdims=True)
        tinted = grey * np.array([1.07, 0.74, 0.43], np.float32)
        out = (1 - self.strength) * img + self.strength * tinted
        return np.clip(out, 0, 255).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("strength",)  # so A.to_dict and the run's saved config can describe it


class TrainableSummary(pl.Callback):
    """Prints, when fitting starts, how many parameters train and how many the recipe froze: a quick
    check that ``model.freeze`` matched what was meant."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in pl_module.parameters() if not p.requires_grad)
        if trainer.is_global_zero:
            print(f"TrainableSummary: {trainable:,} trainable, {frozen:,} frozen parameters", flush=True)
