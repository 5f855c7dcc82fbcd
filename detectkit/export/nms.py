"""Post-processing that lives inside the exported graph (ONNX ``NonMaxSuppression``).

``torchvision.ops.batched_nms`` has no ONNX form that runtimes agree on, so the NMS step is a
``torch.autograd.Function`` whose ``symbolic`` emits the standard ``NonMaxSuppression`` op and
whose eager ``forward`` reproduces that op's semantics (per batch and class: ``score >
score_threshold``, greedy IoU suppression, at most ``max_output_boxes_per_class``). Everything
around it is plain tensor algebra that the TorchScript exporter turns into static-shape ops,
with only the batch dimension (and the number of detections) dynamic.

Candidate selection follows :func:`detectkit.ops.nms.postprocess`: with ``multi_label`` the
``top_k`` best (anchor, class) pairs, otherwise the ``top_k`` best anchors with their best class;
per-class NMS is done by giving each pair a one-hot score row; the ``max_det`` best survivors per
image are kept. Output formats are super-gradients' ``DetectionOutputFormatMode``:

* ``"batch"``: ``num_predictions [B,1] int64``, ``pred_boxes [B,max_det,4] float32``,
  ``pred_scores [B,max_det] float32``, ``pred_classes [B,max_det] int64``; rows past
  ``num_predictions`` hold ``pad_value`` (SG uses -1); rows sorted by descending score.
* ``"flat"``: ``[N,7] float32`` rows ``batch_index, x1, y1, x2, y2, score, class``, image-major,
  descending score within an image.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.ops import batched_nms

from detectkit.ops.nms import PostprocessConfig

__all__ = ["OUTPUT_NAMES", "RAW_TAPS", "onnx_nms", "NMSPostprocess", "DetectorWithNMS", "split_flat", "split_batch"]

#: output tensor names of the exported graphs, per format (``None`` = raw boxes and scores)
OUTPUT_NAMES: dict[str | None, list[str]] = {
    None: ["boxes", "scores"],
    "batch": ["num_predictions", "pred_boxes", "pred_scores", "pred_classes"],
    "flat": ["predictions"],
}


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression``: ``boxes [B,N,4]``, ``scores [B,C,N]`` -> ``[K,3]`` (batch, class, box)."""

    @staticmethod
    def forward(ctx, boxes, scores, max_output_boxes_per_class: int, iou_threshold: float, score_threshold: float):
        rows = []
        for b in range(scores.shape[0]):
            cls, idx = (scores[b] > score_threshold).nonzero(as_tuple=True)
            if idx.numel() == 0:
                continue
            keep = batched_nms(boxes[b, idx].float(), scores[b, cls, idx].float(), cls, iou_threshold)
            cls, idx = cls[keep], idx[keep]  # descending score; cap each class at max_output
            for c in cls.unique(sorted=True):
                sel = idx[cls == c][:max_output_boxes_per_class]
                rows.append(torch.stack((torch.full_like(sel, b), torch.full_like(sel, int(c)), sel), dim=1))
        if not rows:
            return torch.zeros((0, 3), dtype=torch.long, device=boxes.device)
        return torch.cat(rows).long()

    @staticmethod
    def symbolic(g, boxes, scores, max_output_boxes_per_class, iou_threshold, score_threshold):
        out = g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            g.op("Constant", value_t=torch.tensor([max_output_boxes_per_class], dtype=torch.long)),
            g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float)),
            g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float)),
            center_point_box_i=0,
        )
        return out


def onnx_nms(
    boxes: torch.Tensor, scores: torch.Tensor, max_output_boxes_per_class: int, iou_threshold: float, score_threshold: float
) -> torch.Tensor:
    """``NonMaxSuppression`` that runs eagerly and exports as the ONNX op (xyxy boxes)."""
    return _NonMaxSuppression.apply(
        boxes, scores, int(max_output_boxes_per_class), float(iou_threshold), float(score_threshold)
    )


class NMSPostprocess(nn.Module):
    """Decoded ``boxes [B,A,4]``, ``scores [B,A,C]`` -> detections in SG's batch or flat format."""

    def __init__(
        self,
        conf: float = 0.25,
        iou: float = 0.7,
        top_k: int = 1000,
        max_det: int = 300,
        multi_label: bool = True,
        agnostic: bool = False,
        output_format: str = "batch",
        pad_value: float = -1.0,
    ) -> None:
        super().__init__()
        if output_format not in ("batch", "flat"):
            raise ValueError(f"output_format must be 'batch' or 'flat', got {output_format!r}")
        self.conf, self.iou, self.top_k, self.max_det = float(conf), float(iou), int(top_k), int(max_det)
        self.multi_label, self.agnostic = multi_label, agnostic
        self.output_format, self.pad_value = output_format, float(pad_value)

    @classmethod
    def from_config(cls, config: PostprocessConfig, output_format: str = "batch") -> NMSPostprocess:
        """The in-graph form of the one post-processing settings."""
        return cls(output_format=output_format, **config.to_dict())

    def candidates(self, boxes: torch.Tensor, scores: torch.Tensor):
        """The ``top_k`` best candidates per image: boxes ``[B,k,4]``, scores ``[B,k]``, classes ``[B,k]``."""
        num_anchors, num_classes = int(scores.shape[1]), int(scores.shape[2])
        if self.multi_label:
            k = min(self.top_k, num_anchors * num_classes)
            cand_scores, flat_idx = scores.flatten(1).topk(k, dim=1)
            anchor = torch.div(flat_idx, num_classes, rounding_mode="floor")
            cls = flat_idx - anchor * num_classes
        else:
            best, best_cls = scores.max(dim=2)
            k = min(self.top_k, num_anchors)
            cand_scores, anchor = best.topk(k, dim=1)
            cls = best_cls.gather(1, anchor)
        cand_boxes = boxes.gather(1, anchor.unsqueeze(-1).expand(-1, -1, 4))
        return cand_boxes, cand_scores, cls

    def forward(self, boxes: torch.Tensor, scores: torch.Tensor):
        num_classes = int(scores.shape[2])
        cand_boxes, cand_scores, cls = self.candidates(boxes.float(), scores.float())
        k = int(cand_scores.shape[1])
        if self.agnostic:
            nms_scores = cand_scores.unsqueeze(1)  # [B,1,k]
        else:  # one-hot rows: per-class NMS over the candidate pairs
            classes = torch.arange(num_classes, device=cls.device).view(1, -1, 1)
            nms_scores = (cls.unsqueeze(1) == classes).to(cand_scores.dtype) * cand_scores.unsqueeze(1)
        selected = onnx_nms(cand_boxes, nms_scores, self.max_det, self.iou, self.conf)
        b, j = selected[:, 0], selected[:, 2]
        flat = b * k + j
        det_scores = cand_scores.reshape(-1)[flat]
        det_boxes = cand_boxes.reshape(-1, 4)[flat]
        det_cls = cls.reshape(-1)[flat]

        # image-major, descending score; rank inside the image from a one-hot cumulative sum
        order = (b.to(det_scores.dtype) * 2.0 + (1.0 - det_scores)).argsort()
        b, det_scores, det_boxes, det_cls = b[order], det_scores[order], det_boxes[order], det_cls[order]
        batch_ids = torch.ones_like(cand_scores[:, 0], dtype=torch.long).cumsum(0) - 1  # [B], dynamic
        onehot = (b.unsqueeze(1) == batch_ids.unsqueeze(0)).long()  # [K,B]
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1
        keep = rank < self.max_det
        b, rank, det_scores, det_boxes, det_cls = b[keep], rank[keep], det_scores[keep], det_boxes[keep], det_cls[keep]

        if self.output_format == "flat":
            return torch.cat(
                (b.unsqueeze(1).float(), det_boxes, det_scores.unsqueeze(1), det_cls.unsqueeze(1).float()), dim=1
            )
        counts = onehot.sum(0).clamp(max=self.max_det).unsqueeze(1)  # [B,1] int64
        slot = b * self.max_det + rank
        template = cand_scores[:, :1].expand(-1, self.max_det).reshape(-1)  # [B*max_det], dynamic B
        pad = torch.full_like(template, self.pad_value)
        pred_scores = pad.scatter(0, slot, det_scores).view(-1, self.max_det)
        pred_classes = pad.long().scatter(0, slot, det_cls).view(-1, self.max_det)
        box_pad = pad.unsqueeze(1).expand(-1, 4)
        pred_boxes = box_pad.scatter(0, slot.unsqueeze(1).expand(-1, 4), det_boxes).view(-1, self.max_det, 4)
        return counts, pred_boxes, pred_scores, pred_classes


#: names of the raw head outputs an NMS graph is exported with (then removed from its outputs):
#: the nodes keep these names, so verification can tap boxes/scores before NMS in the shipped graph
RAW_TAPS = ("raw_boxes", "raw_scores")


class DetectorWithNMS(nn.Module):
    """An eval-mode detector followed by :class:`NMSPostprocess` (the graph that gets exported).
    ``expose_raw`` also returns the boxes/scores before NMS (named :data:`RAW_TAPS` at export)."""

    def __init__(self, model: nn.Module, postprocess: NMSPostprocess, expose_raw: bool = False) -> None:
        super().__init__()
        self.model = model
        self.postprocess = postprocess
        self.expose_raw = expose_raw

    def forward(self, images: torch.Tensor):
        boxes, scores = self.model(images)
        out = self.postprocess(boxes, scores)
        if self.expose_raw:
            return (*(out if isinstance(out, tuple) else (out,)), boxes, scores)
        return out


def split_flat(predictions, batch_size: int) -> list:
    """Flat ``[N,7]`` rows -> per image ``[n,6]`` rows ``x1,y1,x2,y2,score,class`` (numpy or torch)."""
    return [predictions[predictions[:, 0] == i][:, 1:] for i in range(batch_size)]


def split_batch(num_predictions, boxes, scores, classes) -> list:
    """Batch format -> per image ``[n,6]`` numpy rows ``x1,y1,x2,y2,score,class``."""
    import numpy as np

    out = []
    for i in range(len(num_predictions)):
        n = int(num_predictions[i, 0])
        out.append(
            np.concatenate(
                (np.asarray(boxes[i, :n]), np.asarray(scores[i, :n])[:, None], np.asarray(classes[i, :n])[:, None]),
                axis=1,
            ).astype(np.float32)
        )
    return out
