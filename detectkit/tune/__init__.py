"""``detectkit tune``: hyperparameter search over a fit recipe (Optuna, single objective: val mAP).

- :mod:`.config`: the typed config (:class:`TuneConfig`) and the search space: named
  hyperparameters (``lr``, ``weight_decay``, ``warmup_steps``, augmentation strengths,
  ``image_size``) mapped onto the recipe's keys;
- :mod:`.study`: the study (TPE, MedianPruner, RDB storage shared by workers), one trial = a real
  short ``detectkit fit`` of the recipe with the sampled overrides, the results table and the best
  trial written as a recipe;
- :mod:`.commands`: the command line.

Imports here stay light: torch, Lightning and Optuna load when a function needs them.
"""

from detectkit.tune.config import PARAMETERS, TuneConfig

__all__ = ["PARAMETERS", "TuneConfig"]
