"""``detectkit nas``: multi-objective architecture search over the YOLO-NAS space (Optuna).

- :mod:`.space`: the YAML-described space (YOLO-NAS S/M/L are points of it) -> ``YoloNASConfig``;
- :mod:`.objectives`: parameters/MACs, latency measured on the target backend (onnxruntime CPU,
  optionally INT8; TensorRT behind an import check), proxy accuracy from a short training;
- :mod:`.search`: the Optuna study (NSGA-II or TPE, seeded with S/M/L, RDB storage, resumable);
- :mod:`.report`: Pareto front table/plot and the export of a trial as architecture + fit recipe.
Imports here stay light: torch, Lightning and Optuna load when a function needs them.
"""

from detectkit.nas.space import SearchSpace

__all__ = ["SearchSpace"]
