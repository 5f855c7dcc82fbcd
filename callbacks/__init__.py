"""Lightning callbacks for shipping detectors: export, QAT/PTQ, structured pruning, distillation.

Imported as ``detectkit.callbacks`` (the package directory is mapped in pyproject.toml). The
heavy libraries (modelopt, torch-pruning, onnx) load only when a callback does its work.
"""

from detectkit.callbacks.distillation import KnowledgeDistillation
from detectkit.callbacks.export import ExportOnFitEnd
from detectkit.callbacks.pruning import StructuredPruning
from detectkit.callbacks.quantization import QuantizationAwareTraining, quantization_sensitivity

__all__ = [
    "KnowledgeDistillation",
    "ExportOnFitEnd", "QuantizationAwareTraining", "StructuredPruning", "quantization_sensitivity"]

from detectkit.callbacks.prediction_images import LogValidationPredictions  # noqa: E402
from detectkit.callbacks.tracking import TrackRun  # noqa: E402

__all__ += ["LogValidationPredictions", "TrackRun"]

from detectkit.callbacks.nan_guard import NanGuard, NonFiniteLossError, NonFiniteWeightsError  # noqa: E402

__all__ += ["NanGuard", "NonFiniteLossError", "NonFiniteWeightsError"]

from detectkit.callbacks.run_report import RunReport  # noqa: E402

__all__ += ["RunReport"]

from detectkit.callbacks.progress import PlainProgressBar  # noqa: E402

__all__ += ["PlainProgressBar"]

from detectkit.callbacks.stop_on_signal import StopOnSignal  # noqa: E402

__all__ += ["StopOnSignal"]

from detectkit.callbacks.checkpoints import LastCheckpoint  # noqa: E402

__all__ += ["LastCheckpoint"]
