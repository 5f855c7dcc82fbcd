"""INT8 for onnxruntime on CPU: static QDQ quantization of an exported FP32 graph.

The modelopt Q/DQ graph (QAT/PTQ callbacks) follows TensorRT's scheme: symmetric int8, inputs of
each layer quantized, outputs left to the next layer. TensorRT turns that into int8 kernels;
onnxruntime's CPU provider does not (it fuses ``DQ -> Conv -> Q`` into ``QLinearConv`` only when
the conv output is quantized directly and a ReLU can be absorbed by an asymmetric zero point),
so that graph runs *slower* than FP32 there. For CPU deployment onnxruntime's own
``quantize_static`` is the tool: per-channel int8 weights, asymmetric uint8 activations,
calibrated on real images, giving ``QLinearConv`` kernels.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["quantize_for_onnxruntime"]


def quantize_for_onnxruntime(
    fp32_onnx: str | os.PathLike,
    output: str | os.PathLike,
    calibration: Iterable[np.ndarray],
    per_channel: bool = True,
    input_name: str = "images",
) -> Path:
    """Static QDQ INT8 of ``fp32_onnx`` calibrated on ``calibration`` (graph-input arrays, e.g. float NCHW)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    prepared = output.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_onnx), str(prepared))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch)}

    try:
        quantize_static(
            str(prepared), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)
    return output
