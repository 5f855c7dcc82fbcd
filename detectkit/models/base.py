"""The interface every detectkit detector implements (both families)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from detectkit.models.outputs import HeadOutput
from detectkit.nn.dfl import DFL
from detectkit.ops.boxes import distance2bbox
from detectkit.ops.nms import PostprocessConfig


@dataclass(frozen=True)
class InferenceDefaults:
    """What predict, export and serve use when the caller does not say: the input the model was
    validated at and its post-processing. A fresh model gets super-gradients' COCO settings
    (640 input, longest side 636, centred, pad 114); ``detectkit.load`` sets those a trained
    checkpoint recorded (e.g. 128 px, fit inside, as its validation letterbox did).
    """

    image_size: tuple[int, int] = (640, 640)
    #: letterbox: resize the longest side to this many pixels, then pad; None = fit inside image_size
    longest: int | None = 636
    center: bool = True
    pad_value: int = 114
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> InferenceDefaults:
        values = dict(values or {})
        post = PostprocessConfig.from_dict(values.pop("postprocess", None))
        size = values.pop("image_size", (640, 640))
        size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        known = {"longest", "center", "pad_value"}
        return cls(image_size=size, postprocess=post, **{k: v for k, v in values.items() if k in known})


class Detector(nn.Module):
    """Train mode: ``forward(x) -> HeadOutput``. Eval mode: ``forward(x) -> (boxes, scores)``.

    ``boxes [B,A,4]`` are xyxy in input pixels (not clipped), ``scores [B,A,C]`` sigmoid
    probabilities. Inputs are float RGB NCHW in [0, 1], sides multiples of 32.
    """

    num_classes: int
    class_names: list[str]
    #: the registry name and builder arguments it was built with (set by ``registry.create_model``);
    #: a checkpoint record stores them so that ``detectkit.load`` rebuilds the same architecture
    registry_name: str | None = None
    registry_kwargs: dict[str, Any] = {}  # replaced per instance, never mutated
    #: the ``checkpoint["detectkit"]`` record this detector was loaded from (None: built, or foreign)
    record: dict[str, Any] | None = None
    strides: tuple[int, ...] = (8, 16, 32)
    #: name of the training loss in detectkit.losses that matches the reference recipe
    default_loss: str = "ppyoloe"

    def __init__(self, num_classes: int, bins: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_names = [str(i) for i in range(num_classes)]
        self.dfl = DFL(bins)
        #: predict/export/serve defaults; ``detectkit.load`` replaces them with a checkpoint's record
        self.inference = InferenceDefaults()
        #: label -> the training dataset's category id (COCO writers); None = ``label + 1``
        self.category_ids: list[int] | None = None

    def apply_record(self, record: Mapping[str, Any] | None) -> None:
        """The record hook of :class:`detectkit.checkpoint.RecordedModel`: after the weights of a
        checkpoint loaded, take its classes, inference defaults and dataset category ids."""
        record = dict(record or {})
        if record.get("class_names"):
            self.class_names = list(record["class_names"])
        self.inference = InferenceDefaults.from_dict(record.get("inference"))
        self.category_ids = list(record["category_ids"]) if record.get("category_ids") is not None else None
        self.record = record or None

    def decode(self, head: HeadOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The one box decoder: DFL expectation -> xyxy pixels, sigmoid scores."""
        ltrb = self.dfl(head.reg_distri) * head.stride_tensor
        boxes = distance2bbox(head.anchor_points, ltrb)
        return boxes, head.cls_logits.sigmoid()

    def head_forward(self, x: torch.Tensor) -> HeadOutput:  # implemented by each family
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Any:
        head = self.head_forward(x)
        if self.training:
            return head
        return self.decode(head)

    def fuse(self) -> Detector:  # implemented by each family
        raise NotImplementedError

    def predict(self, source: Any, conf: float | None = None, iou: float | None = None, **kwargs: Any):
        """Detections on images given as paths, folders, URLs, PIL images, arrays or videos; settings
        left at None come from ``self.inference`` (see :func:`detectkit.predict.predict`)."""
        from detectkit.predict import predict

        return predict(self, source, conf=conf, iou=iou, **kwargs)
