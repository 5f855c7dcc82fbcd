"""Compression algorithms without Lightning.

* :mod:`~detectkit.compress.prune`: structured pruning on torch-pruning (MACs targets, layer-wise
  ratios, YOLO-World's C2f split), the record/replay of a pruned architecture;
* :mod:`~detectkit.compress.sensitivity`: per-unit pruning sensitivity, layer-wise budgets,
  BatchNorm recalibration;
* :mod:`~detectkit.compress.latency`: per-unit onnxruntime time and MACs, the latency side of the
  layer-wise budgets;
* :mod:`~detectkit.compress.distill`: knowledge-distillation terms, teacher, feature adapters;
* :mod:`~detectkit.compress.quantize`: INT8 quantization (modelopt), per-layer quantization
  sensitivity for mixed precision.

The Lightning callbacks in ``detectkit.callbacks`` schedule them; ``detectkit.checkpoint``
replays the architecture ops they record. Nothing here imports the callbacks.
"""
