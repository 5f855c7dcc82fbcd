"""Compression algorithms without Lightning.

* :mod:`~detectkit.compress.prune`: structured pruning on torch-pruning (MACs targets, unit
  ratios, YOLO-World's C2f split), the record/replay of a pruned architecture;
* :mod:`~detectkit.compress.sensitivity` (on top of prune and quantize): per-unit pruning
  sensitivity, layer-wise budgets and ``layerwise_prune``, BatchNorm recalibration, per-layer
  quantization sensitivity for mixed precision;
* :mod:`~detectkit.compress.latency`: per-unit onnxruntime time and MACs, the latency side of the
  layer-wise budgets;
* :mod:`~detectkit.compress.distill`: knowledge-distillation terms, teacher, feature adapters;
* :mod:`~detectkit.compress.quantize`: INT8 quantization (modelopt), PTQ and its restore.

The Lightning callbacks in ``detectkit.callbacks`` schedule them. Importing this package registers
how ``detectkit.checkpoint`` replays the architecture ops they record (``prune``, ``quantize``);
nothing here imports the callbacks.
"""

from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from detectkit.checkpoint import register_architecture_op


def _replay_prune(model: nn.Module, op: Mapping[str, Any]) -> nn.Module:
    from detectkit.compress.prune import apply_pruned_shapes  # torch-pruning: only when a record has the op

    return apply_pruned_shapes(model, op["shapes"], fused=op.get("fused", True))


def _replay_quantize(model: nn.Module, op: Mapping[str, Any]) -> nn.Module:
    from detectkit.compress.quantize import restore_quantized  # modelopt: only when a record has the op

    return restore_quantized(model, dict(op))


# the architecture ops the pruning and QAT callbacks record, replayed by detectkit.checkpoint on load
register_architecture_op("prune", _replay_prune)
register_architecture_op("quantize", _replay_quantize)
