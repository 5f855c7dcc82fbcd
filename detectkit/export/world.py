"""YOLO-World ONNX graphs: vocabulary baked in, or text embeddings as a runtime input.

* :func:`export_baked` reparameterises a copy of the model (vocabulary in the weights) and
  exports ``images -> boxes, scores`` through :func:`detectkit.export.deploy.export_detector`,
  so NMS / uint8 input options apply unchanged.
* :func:`export_runtime_text` exports ``(images [B,3,H,W], text_embeddings [K,512]) -> boxes,
  scores [B,A,K]`` with dynamic batch and dynamic K: one file serves any vocabulary.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from detectkit.export.onnx import export_onnx, onnx_max_abs_error
from detectkit.models.yolo_world.model import YoloWorld

RUNTIME_INPUTS = ("images", "text_embeddings")
OUTPUTS = ("boxes", "scores")


class RuntimeTextDetector(nn.Module):
    """Eval-mode YOLO-World taking the vocabulary ``[K, 512]`` as a second input."""

    def __init__(self, model: YoloWorld) -> None:
        super().__init__()
        if model.reparameterized:
            raise ValueError("a reparameterized model has no text input; export it with export_baked")
        self.model = model.eval()

    def forward(
        self, images: torch.Tensor, text_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(images, text=text_embeddings)


def export_runtime_text(
    model: YoloWorld,
    path: str | os.PathLike,
    image_size: int | tuple[int, int] = 640,
    num_prompts: int | None = None,
    opset: int = 17,
    check: bool = True,
    atol: float = 1e-3,
) -> dict[str, Any]:
    """ONNX with inputs ``images`` and ``text_embeddings`` (dynamic batch and K); checked in onnxruntime."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    wrapper = RuntimeTextDetector(copy.deepcopy(model).cpu().float().eval())
    k = num_prompts or model.num_classes
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, h, w, generator=gen)
    text = torch.nn.functional.normalize(torch.randn(k, model.text_dim, generator=gen), dim=-1)
    axes = {"text_embeddings": {0: "num_prompts"}, "scores": {0: "batch", 2: "num_prompts"}}
    export_onnx(wrapper, path, (images, text), RUNTIME_INPUTS, OUTPUTS, dynamic_axes=axes, opset=opset)
    result: dict[str, Any] = {"path": str(path), "inputs": list(RUNTIME_INPUTS), "outputs": list(OUTPUTS)}
    if check:
        # check on another batch size and vocabulary size than the traced ones
        check_images = torch.rand(2, 3, h, w, generator=gen)
        check_text = torch.nn.functional.normalize(torch.randn(k + 2, model.text_dim, generator=gen), dim=-1)
        err_boxes, err_scores = onnx_max_abs_error(path, wrapper, (check_images, check_text), RUNTIME_INPUTS)
        result.update(max_abs_error_boxes=err_boxes, max_abs_error_scores=err_scores)
        if err_boxes / max(h, w) > atol or err_scores > atol:
            raise AssertionError(
                f"onnxruntime differs from PyTorch: boxes {err_boxes:.4g} px, scores {err_scores:.4g}"
            )
    return result


def export_baked(model: YoloWorld, path: str | os.PathLike, config: Any = None, **kwargs: Any):
    """Reparameterise a copy (current vocabulary baked in) and export ``images -> boxes, scores``."""
    from detectkit.export.deploy import export_detector

    baked = copy.deepcopy(model).cpu().float().eval().reparameterize()
    return export_detector(baked, Path(path), config, **kwargs)
