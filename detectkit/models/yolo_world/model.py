"""YOLO-World v2 (ultralytics ``yolov8{s,m,l,x}-worldv2``): backbone + text-guided PAN + head.

The detector only ever sees text *embeddings* ``[K, 512]`` (L2-normalised CLIP text
features); :mod:`detectkit.models.yolo_world.text` turns class names into them.

Vocabulary without text: a freshly built model holds ``num_classes`` placeholder embeddings
(unit vectors from a fixed-seed generator, so two builds agree) in the persistent buffer
``txt_feats [K, 512]``. ``set_classes`` / ``set_text_embeddings`` replace it; loading a state
dict with another K resizes it. Per-image vocabularies go through
``forward(x, text=[B,K,512], text_mask=[B,K])``.

Fixed neck guide: ``set_neck_guide(emb [G,512])`` makes a fixed set of prompts (a base
vocabulary) the only text that gates the neck, whatever prompts the head scores. The image
features then no longer depend on the queried vocabulary, so a class's boxes and scores are
the same whichever other classes are asked for (what k-shot new classes rely on: the base
classes answer exactly as before). It is the persistent buffer ``guide_feats`` (absent = the
scored prompts guide the neck, as in YOLO-World).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from detectkit.models.base import Detector
from detectkit.models.outputs import HeadOutput
from detectkit.models.yolo_world.backbone import SCALES, CSPDarknet
from detectkit.models.yolo_world.head import WorldDetectHead
from detectkit.models.yolo_world.neck import WorldPAN
from detectkit.nn.conv import fuse_conv_bn_act
from detectkit.ops.boxes import make_anchors
from detectkit.registry import register_model

TEXT_DIM = 512
BINS = 16


def placeholder_embeddings(n: int, dim: int = TEXT_DIM) -> torch.Tensor:
    """Deterministic unit vectors standing for an unset vocabulary of ``n`` classes."""
    gen = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(n, dim, generator=gen), dim=-1)


class YoloWorld(Detector):
    """Open-vocabulary YOLOv8 detector. ``variant`` is one of ``s, m, l, x`` (``n`` also builds)."""

    default_loss = "v8"

    def __init__(self, variant: str = "s", num_classes: int = 80, text_dim: int = TEXT_DIM) -> None:
        if variant not in SCALES:
            raise ValueError(f"unknown YOLO-World variant {variant!r}; choose from {sorted(SCALES)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        super().__init__(num_classes, bins=BINS)
        scale = SCALES[variant]
        self.variant = variant
        self.text_dim = text_dim
        self.backbone = CSPDarknet(scale)
        self.neck = WorldPAN(scale, self.backbone.out_channels, text_dim)
        self.head = WorldDetectHead(self.neck.out_channels, num_classes, text_dim, BINS)
        self.register_buffer("txt_feats", placeholder_embeddings(num_classes, text_dim))
        # fixed prompts that guide the neck (None: the scored prompts do); see set_neck_guide
        self.register_buffer("guide_feats", None)
        self.reparameterized = False

    # ----------------------------------------------------------------- vocabulary
    def set_text_embeddings(self, embeddings: torch.Tensor, names: Sequence[str] | None = None) -> YoloWorld:
        """Install a vocabulary ``[K, 512]`` (L2-normalised, as CLIP's ``text_embeds / norm``)."""
        if self.reparameterized:
            raise RuntimeError("the vocabulary is baked in (reparameterize); build a new model to change it")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.text_dim or embeddings.shape[0] < 1:
            raise ValueError(
                f"text embeddings must be [K>=1, {self.text_dim}], got {tuple(embeddings.shape)}"
            )
        if names is not None and len(names) != embeddings.shape[0]:
            raise ValueError(f"{len(names)} names for {embeddings.shape[0]} embeddings")
        self.txt_feats = embeddings.detach().to(self.txt_feats.device, self.txt_feats.dtype).clone()
        self.num_classes = embeddings.shape[0]
        self.class_names = list(names) if names is not None else [str(i) for i in range(self.num_classes)]
        return self

    def set_neck_guide(self, embeddings: torch.Tensor | None) -> YoloWorld:
        """Gate the neck with the fixed prompts ``embeddings [G, 512]`` only (``None``: the scored
        prompts guide it again). Scores of any vocabulary then use the same image features."""
        if self.reparameterized:
            raise RuntimeError("the vocabulary is baked in (reparameterize); build a new model to change it")
        if embeddings is None:
            self.guide_feats = None
            return self
        if embeddings.ndim != 2 or embeddings.shape[1] != self.text_dim or embeddings.shape[0] < 1:
            raise ValueError(f"neck guide embeddings must be [G>=1, {self.text_dim}], got {tuple(embeddings.shape)}")
        self.guide_feats = embeddings.detach().to(self.txt_feats.device, self.txt_feats.dtype).clone()
        return self

    def set_classes(self, names: Sequence[str], encoder: Any = None) -> YoloWorld:
        """Encode ``names`` with a :class:`TextEncoder` (default: local CLIP ViT-B/32) and install them."""
        from detectkit.models.yolo_world.text import default_text_encoder, encode_cached

        names = list(names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"class names must be a non-empty list of non-empty strings, got {names!r}")
        encoder = default_text_encoder() if encoder is None else encoder
        return self.set_text_embeddings(encode_cached(encoder, names), names)

    def reparameterize(self) -> YoloWorld:
        """Bake the current vocabulary into the neck guides and a 1x1 class conv: a plain K-class detector."""
        if self.reparameterized:
            return self
        text = self.txt_feats
        guide = text if self.guide_feats is None else self.guide_feats
        for layer in self.neck.attn_layers():
            layer.attn.bake(guide)
        self.head.bake(text)
        self.reparameterized = True
        return self

    def prepare_load(self, state_dict: Any, prefix: str = "") -> None:
        """Give the optional ``guide_feats`` buffer the presence and shape the weights have (a
        k-shot model carries its fixed neck guide, a plain one none), so a strict load fits."""
        if self.reparameterized:
            return
        guide = state_dict.get(prefix + "guide_feats")
        if isinstance(guide, torch.Tensor):
            if self.guide_feats is None or self.guide_feats.shape != guide.shape:
                self.guide_feats = torch.empty_like(guide, device=self.txt_feats.device, dtype=self.txt_feats.dtype)
        elif self.guide_feats is not None:
            self.guide_feats = None  # weights without a guide: the scored prompts guide the neck

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # a checkpoint trained on another vocabulary size carries its own txt_feats: adopt its K
        key = prefix + "txt_feats"
        incoming = state_dict.get(key)
        if (
            isinstance(incoming, torch.Tensor)
            and incoming.shape != self.txt_feats.shape
            and not self.reparameterized
        ):
            if incoming.ndim == 2 and incoming.shape[1] == self.text_dim:
                self.txt_feats = torch.empty_like(
                    incoming, device=self.txt_feats.device, dtype=self.txt_feats.dtype
                )
                self.num_classes = incoming.shape[0]
                self.class_names = [str(i) for i in range(self.num_classes)]
        self.prepare_load(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    # ----------------------------------------------------------------- forward
    def _text_inputs(
        self, batch: int, text: torch.Tensor | None, text_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if text is None:
            if text_mask is not None:
                raise ValueError("text_mask given without per-image text embeddings")
            if self.reparameterized:
                return None, None
            text = self.txt_feats
        if self.reparameterized:
            raise RuntimeError("this model has its vocabulary baked in; it takes no text embeddings")
        if text.ndim == 2:
            text = text.unsqueeze(0).expand(batch, -1, -1)
        if torch.jit.is_tracing():  # shapes are symbolic in an export trace; checked at run time
            return text, None if text_mask is None else text_mask.to(torch.bool)
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != self.text_dim:
            raise ValueError(
                f"text embeddings must be [K,{self.text_dim}] or [B={batch},K,{self.text_dim}], "
                f"got {tuple(text.shape)}"
            )
        if text_mask is not None:
            if text_mask.shape != text.shape[:2]:
                raise ValueError(
                    f"text_mask must be [B,K]={tuple(text.shape[:2])}, got {tuple(text_mask.shape)}"
                )
            text_mask = text_mask.to(torch.bool)
        return text, text_mask

    @staticmethod
    def _check_images(x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be [B,3,H,W], got {tuple(x.shape)}")
        if x.shape[2] % 32 or x.shape[3] % 32:
            raise ValueError(f"image sides must be multiples of 32, got {tuple(x.shape[2:])}")

    def features(
        self, x: torch.Tensor, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> dict[str, tuple[torch.Tensor, ...]]:
        """Backbone (P3, P4, P5) and neck outputs, for inspection and distillation."""
        text, text_mask = self._text_inputs(x.shape[0], text, text_mask)
        backbone = self.backbone(x)
        neck = self.neck(backbone, *self._neck_text(x.shape[0], text, text_mask))
        return {"backbone": backbone, "neck": neck}

    def _neck_text(
        self, batch: int, text: torch.Tensor | None, text_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The prompts that gate the neck: the fixed guide when one is set, else the scored ones."""
        if self.guide_feats is None or self.reparameterized:
            return text, text_mask
        return self.guide_feats.to(text.dtype if text is not None else self.guide_feats.dtype).unsqueeze(0).expand(
            batch, -1, -1
        ), None

    def head_forward(
        self, x: torch.Tensor, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> HeadOutput:
        if not torch.jit.is_tracing():  # an export trace would freeze these checks as constants
            self._check_images(x)
        text, text_mask = self._text_inputs(x.shape[0], text, text_mask)
        feats = self.neck(self.backbone(x), *self._neck_text(x.shape[0], text, text_mask))
        cls_logits, reg_distri = self.head(feats, text, text_mask)
        anchors, strides = make_anchors(
            [f.shape[2:] for f in feats], self.strides, device=x.device, dtype=cls_logits.dtype
        )
        return HeadOutput(cls_logits, reg_distri, anchors, strides, BINS, tuple(feats))

    def forward(
        self, x: torch.Tensor, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> Any:
        """Train: :class:`HeadOutput`. Eval: ``(boxes [B,A,4] xyxy px, scores [B,A,K])``."""
        head = self.head_forward(x, text, text_mask)
        return head if self.training else self.decode(head)

    def fuse(self) -> YoloWorld:
        """Fold every Conv+BN pair (inference only: uses running statistics)."""
        fuse_conv_bn_act(self)
        return self


def _build(variant: str, num_classes: int, checkpoint: str | None, kwargs: dict[str, Any]) -> YoloWorld:
    """Shared builder. ``class_names`` sets K (and, with ``text_encoder``, the embeddings);
    ``checkpoint`` is an ultralytics ``.pt`` / state dict or a detectkit state dict;
    ``pretrained`` (a tag such as ``"coco"``, ``True``, a path or a URL) is resolved by
    :mod:`detectkit.models.pretrained` (a tag missing from the cache is fetched unless ``download=False``).
    An ultralytics ``.pt`` that carries its vocabulary (``txt_feats``, ``names``) installs it.
    """
    class_names = kwargs.pop("class_names", None)
    text_encoder = kwargs.pop("text_encoder", None)
    pretrained = kwargs.pop("pretrained", None)
    download = kwargs.pop("download", True)
    if kwargs:
        raise TypeError(f"yolo_world_v2_{variant}: unexpected arguments {sorted(kwargs)}")
    if checkpoint is not None and pretrained:
        raise ValueError(f"yolo_world_v2_{variant}: pass either checkpoint= or pretrained=, not both")
    if pretrained:
        from detectkit.models.pretrained import resolve_pretrained

        checkpoint = resolve_pretrained(f"yolo_world_v2_{variant}", pretrained, download=download)
    if class_names is not None:
        num_classes = len(class_names)
    model = YoloWorld(variant, num_classes)
    if checkpoint is not None:
        from detectkit.models.yolo_world.weights import load_weights

        load_weights(model, checkpoint)
    if class_names is not None:
        if text_encoder is not None:
            model.set_classes(class_names, encoder=text_encoder)
        elif len(class_names) == model.num_classes:
            model.class_names = list(class_names)
        else:
            model.set_text_embeddings(placeholder_embeddings(len(class_names)), class_names)
    return model


@register_model
def yolo_world_v2_s(num_classes: int = 80, checkpoint: str | None = None, **kwargs: Any) -> YoloWorld:
    """YOLO-World v2 S (12.76 M parameters). kwargs: class_names, text_encoder, pretrained, download."""
    return _build("s", num_classes, checkpoint, kwargs)


@register_model
def yolo_world_v2_m(num_classes: int = 80, checkpoint: str | None = None, **kwargs: Any) -> YoloWorld:
    """YOLO-World v2 M (28.38 M parameters). kwargs: class_names, text_encoder, pretrained, download."""
    return _build("m", num_classes, checkpoint, kwargs)


@register_model
def yolo_world_v2_l(num_classes: int = 80, checkpoint: str | None = None, **kwargs: Any) -> YoloWorld:
    """YOLO-World v2 L (46.83 M parameters). kwargs: class_names, text_encoder, pretrained, download."""
    return _build("l", num_classes, checkpoint, kwargs)


@register_model
def yolo_world_v2_x(num_classes: int = 80, checkpoint: str | None = None, **kwargs: Any) -> YoloWorld:
    """YOLO-World v2 X (72.89 M parameters). kwargs: class_names, text_encoder, pretrained, download."""
    return _build("x", num_classes, checkpoint, kwargs)
