"""YOLO-World specifics of :class:`~detectkit.modules.detector.DetectionModule`.

The detector only sees text embeddings; this module decides which ones:

* **Fine-tuning** (default): the dataset's class names are the prompts. At ``setup`` they are
  encoded with the configured text encoder and installed as the model's vocabulary
  (``txt_feats``), unless the model already holds a vocabulary for exactly these names (a
  checkpoint, a resumed run). There is no silent fallback: without a usable encoder the run
  stops with instructions.
* **Prompt tuning** (``prompt_tuning=True``): the vocabulary becomes the only trainable
  parameter (initialised from the encoder), everything else is frozen with BatchNorm kept in
  eval mode. The tuned embeddings stay in ``model.txt_feats``, so checkpoints, EMA,
  ``reparameterize`` and export see them like any vocabulary.
* **New classes, k-shot** (``new_classes=[...]``): the model's vocabulary (a checkpoint trained
  on the base classes) stays as it is and the new names are appended as learnable embeddings
  (initialised from the encoder); everything else is frozen with BatchNorm in eval mode, the
  base rows get no gradient and no weight decay, and the base vocabulary becomes the model's
  fixed neck guide (``YoloWorld.set_neck_guide``). So the base classes' boxes and scores stay
  what they were, to float tolerance, whether the base or the base + new vocabulary is asked.
  The data's class names must be the base names followed by the new ones.
* **Grounding batches** (``texts`` + ``text_mask`` from
  :class:`~detectkit.data.grounding.GroundingDataModule`): each image's prompts are encoded
  (per-phrase LRU cache), the model runs with ``text [B,K,512]`` + ``text_mask`` and the loss
  with ``class_mask`` (a v8 loss is built per K), so padding is never predicted nor penalised.
  Validation batches carry no texts and use the class-name vocabulary.

Text encoder spec (``text_encoder``): ``None`` = CLIP ViT-B/32 from ``$DETECTKIT_CLIP`` or the
local Hugging Face cache; a path to a ``.pt``/``.pth`` file = :class:`EmbeddingsFileEncoder`; a
folder or hub id = :class:`CLIPTextEncoder` (local files only); ``open_clip:MODEL/PRETRAINED``
= :class:`OpenCLIPTextEncoder`; or a :class:`TextEncoder` instance (Python API).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from detectkit.models.yolo_world.model import YoloWorld, placeholder_embeddings
from detectkit.models.yolo_world.text import (
    CLIPTextEncoder,
    EmbeddingsFileEncoder,
    OpenCLIPTextEncoder,
    TextEncoder,
    TextEncoderUnavailable,
    default_text_encoder,
)

__all__ = ["WorldTraining", "attach_world", "resolve_text_encoder", "PhraseCache"]

_EMBEDDING_SUFFIXES = (".pt", ".pth")


def resolve_text_encoder(spec: str | Path | TextEncoder | None) -> TextEncoder:
    """An encoder from a spec (see the module docstring); errors say how to provide CLIP offline."""
    if isinstance(spec, TextEncoder):
        return spec
    if spec is None:
        try:
            return default_text_encoder()
        except TextEncoderUnavailable as err:
            raise TextEncoderUnavailable(
                f"YOLO-World turns the class names into prompts with a text encoder; model.text_encoder is null, "
                f"so the default CLIP is used: {err}"
            ) from err
    text = str(spec)
    if text.startswith("open_clip:"):
        name, _, pretrained = text[len("open_clip:") :].partition("/")
        return OpenCLIPTextEncoder(name or "ViT-B-32", pretrained or "openai")
    if text.endswith(_EMBEDDING_SUFFIXES):
        return EmbeddingsFileEncoder(text)
    return CLIPTextEncoder(text)


class PhraseCache:
    """LRU ``phrase -> [dim]`` for grounding batches (vocabularies change every batch, phrases repeat)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def encode(self, encoder: TextEncoder, names: Sequence[str]) -> torch.Tensor:
        missing = [n for n in dict.fromkeys(names) if n not in self._store]
        self.hits += len(names) - len(missing)
        self.misses += len(missing)
        if missing:
            for name, emb in zip(missing, encoder.encode(missing)):
                self._store[name] = emb
        out = torch.stack([self._store[n] for n in names])
        for n in names:
            self._store.move_to_end(n)
        while len(self._store) > self.max_entries:
            self._store.popitem(last=False)
        return out


class WorldTraining(nn.Module):
    """Vocabulary, prompt tuning and grounding inputs for a :class:`YoloWorld` being trained.

    Registered on the LightningModule *after* the model, so ``train()`` reaches it last and can
    keep the frozen detector's BatchNorm in eval mode during prompt tuning. Its extra state
    (the names the installed vocabulary encodes) is saved in checkpoints: a restored module
    does not re-encode.
    """

    def __init__(
        self,
        model: YoloWorld,
        class_names: Sequence[str] | None,
        text_encoder: str | Path | TextEncoder | None = None,
        prompt_tuning: bool = False,
        loss: str = "v8",
        loss_kwargs: dict[str, Any] | None = None,
        new_classes: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self._model = [model]  # a plain list: the model is the LightningModule's child, not ours
        self.text_encoder_spec = text_encoder
        self._encoder: TextEncoder | None = text_encoder if isinstance(text_encoder, TextEncoder) else None
        self.prompt_tuning = bool(prompt_tuning)
        self.loss_name = loss
        self.loss_kwargs = dict(loss_kwargs or {})
        self.cache = PhraseCache()
        self._losses: dict[int, nn.Module] = {}
        self.class_names = list(class_names) if class_names is not None else None
        if model.reparameterized:
            raise ValueError(
                "this YOLO-World model has its vocabulary baked in (reparameterize); train an unbaked one"
            )
        if new_classes is not None and not list(new_classes):
            raise ValueError("new_classes is empty: name the classes to add (model.new_classes: [name, ...])")
        self.new_classes = list(new_classes) if new_classes is not None else None
        #: k-shot: how many leading vocabulary rows are the fixed base classes (0: not k-shot)
        self.num_base = 0
        if self.new_classes is not None:
            self._append_new_classes()
            return
        # the names the installed embeddings encode (None: placeholder vectors, nothing encoded)
        self.vocabulary: list[str] | None = None if self._is_placeholder() else list(model.class_names)
        if self.class_names is not None and len(self.class_names) != model.num_classes:
            # K follows the data; the embeddings are encoded at setup
            model.set_text_embeddings(
                placeholder_embeddings(len(self.class_names), model.text_dim), self.class_names
            )
            self.vocabulary = None
        if self.prompt_tuning:
            self._make_prompts_trainable()

    # ------------------------------------------------------------------ state
    @property
    def model(self) -> YoloWorld:
        return self._model[0]

    def get_extra_state(self) -> dict[str, Any]:
        return {"vocabulary": self.vocabulary}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict):
            self.vocabulary = state.get("vocabulary")

    def _is_placeholder(self) -> bool:
        feats = self.model.txt_feats.detach()
        ref = placeholder_embeddings(feats.shape[0], feats.shape[1]).to(feats.device, feats.dtype)
        return bool(torch.equal(feats, ref))

    @property
    def encoder(self) -> TextEncoder:
        """The text encoder, built on first use (so inference from a checkpoint never needs CLIP)."""
        if self._encoder is None:
            self._encoder = resolve_text_encoder(self.text_encoder_spec)
        return self._encoder

    @encoder.setter
    def encoder(self, value: TextEncoder) -> None:
        self._encoder = value

    # ------------------------------------------------------------- vocabulary
    def setup(self) -> None:
        """Encode the class names and install them, unless the vocabulary already encodes them."""
        if self.new_classes is not None:
            self._setup_new_classes()
            return
        if self.class_names is None:
            if self.vocabulary is None:
                raise ValueError(
                    "YOLO-World needs class names (from the data: the CLI links data.class_names) or a "
                    "checkpoint with a vocabulary; it will not train on placeholder prompts"
                )
            return
        if self.vocabulary is None and not self._is_placeholder():
            # installed after construction: a restored state dict (EMA checkpoints carry the copy
            # made before setup, whose extra state is empty) or set_text_embeddings by hand
            self.vocabulary = list(self.class_names)
        if self.vocabulary == self.class_names:
            self.model.class_names = list(self.class_names)
            return
        self.install(self.encoder.encode(self.class_names), self.class_names)

    def install(self, embeddings: torch.Tensor, names: Sequence[str]) -> None:
        """Write ``embeddings [K,dim]`` into the model's vocabulary in place (keeps a tuned
        Parameter a Parameter, so optimizers and EMA copies stay attached)."""
        feats = self.model.txt_feats
        if tuple(embeddings.shape) != tuple(feats.shape):
            raise ValueError(f"vocabulary is {tuple(feats.shape)}, got embeddings {tuple(embeddings.shape)}")
        with torch.no_grad():
            feats.copy_(embeddings.to(feats.device, feats.dtype))
        self.model.class_names = list(names)
        self.vocabulary = list(names)

    # ---------------------------------------------------------- prompt tuning
    def _make_prompts_trainable(self) -> None:
        model = self.model
        if not isinstance(model.txt_feats, nn.Parameter):
            feats = model.txt_feats.detach().clone()
            del model._buffers["txt_feats"]
            model.txt_feats = nn.Parameter(feats)
        for p in model.parameters():
            p.requires_grad_(False)
        model.txt_feats.requires_grad_(True)
        # now, not only in train(): Lightning keeps the mode a module has when fit starts
        self._freeze_norms()

    def _freeze_norms(self) -> None:
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def finish_prompt_tuning(self) -> None:
        """Turn the tuned Parameter back into the ordinary vocabulary buffer (``set_classes`` works again)."""
        model = self.model
        if isinstance(model.txt_feats, nn.Parameter):
            feats = model.txt_feats.detach().clone()
            del model._parameters["txt_feats"]
            model.register_buffer("txt_feats", feats)

    # ------------------------------------------------------ new classes (k-shot)
    def _append_new_classes(self) -> None:
        model, new = self.model, list(self.new_classes or [])
        if self.prompt_tuning:
            raise ValueError("new_classes and prompt_tuning are two modes; choose one")
        if not all(isinstance(n, str) and n for n in new) or len(set(new)) != len(new):
            raise ValueError(f"new_classes must be distinct non-empty names, got {new!r}")
        if model.guide_feats is not None:
            raise ValueError("this model already learned new classes (it has a fixed neck guide); "
                             "start k-shot from the base model")
        if self._is_placeholder():
            raise ValueError(
                "new_classes appends to the base vocabulary of a trained model; this one holds placeholder "
                "prompts (give model.checkpoint: the detector trained on the base classes)"
            )
        base = list(model.class_names)
        if set(base) & set(new):
            raise ValueError(f"new_classes {sorted(set(base) & set(new))} are already in the base vocabulary")
        names = base + new
        if self.class_names is not None and list(self.class_names) != names:
            raise ValueError(
                f"k-shot data must name the base classes then the new ones, {names}; it names {self.class_names}"
            )
        self.class_names = names
        self.num_base = len(base)
        base_feats = model.txt_feats.detach().clone()
        model.set_neck_guide(base_feats)  # the base prompts alone gate the neck, as they did in training
        # the new rows are encoded at setup; until then placeholders (a restored state overwrites them)
        model.set_text_embeddings(
            torch.cat([base_feats, placeholder_embeddings(len(new), model.text_dim).to(base_feats)]), names
        )
        self.vocabulary = base  # only the base rows encode their names so far
        self._make_prompts_trainable()
        num_base = self.num_base
        feats = model.txt_feats

        def _only_new_rows(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[:num_base] = 0
            return grad

        feats.register_hook(_only_new_rows)
        feats.no_weight_decay = True  # param_groups: the base rows must not decay towards zero

    def _setup_new_classes(self) -> None:
        names = self.class_names or []
        if self.vocabulary == names:
            return
        new = names[self.num_base :]
        feats = self.model.txt_feats
        placeholder = placeholder_embeddings(len(new), feats.shape[1]).to(feats.device, feats.dtype)
        if not torch.equal(feats[self.num_base :].detach(), placeholder):
            # a restored state dict (resume; an EMA copy made before setup) already holds them
            self.model.class_names = list(names)
            self.vocabulary = list(names)
            return
        with torch.no_grad():
            feats[self.num_base :].copy_(self.encoder.encode(new).to(feats.device, feats.dtype))
        self.model.class_names = list(names)
        self.vocabulary = list(names)

    @property
    def base_classes(self) -> list[str]:
        """The fixed base vocabulary of a k-shot run (``[]`` otherwise)."""
        return list((self.class_names or [])[: self.num_base])

    def train(self, mode: bool = True) -> WorldTraining:
        super().train(mode)
        if (self.prompt_tuning or self.new_classes) and mode:
            self._freeze_norms()
        return self

    # --------------------------------------------------------------- batches
    def model_inputs(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
        """``text``/``text_mask`` for a grounding batch; ``{}`` for a detection batch (class names)."""
        texts = batch.get("texts") if isinstance(batch, dict) else None
        if texts is None:
            return {}
        if self.prompt_tuning or self.new_classes:
            raise ValueError(
                "prompt tuning and new classes learn one fixed vocabulary; they do not take grounding batches"
            )
        mask = batch["text_mask"].to(device=device, dtype=torch.bool)
        if mask.shape[0] != len(texts) or any(int(m.sum()) != len(t) for m, t in zip(mask, texts)):
            raise ValueError("text_mask must mark exactly the first len(texts[b]) prompts of each image")
        from detectkit.data.grounding import embed_vocabulary

        text = embed_vocabulary(texts, mask.shape[1], lambda names: self.cache.encode(self.encoder, names))
        return {"text": text.to(device=device, dtype=self.model.txt_feats.dtype), "text_mask": mask}

    def criterion_for(self, num_prompts: int, default: nn.Module) -> nn.Module:
        """The loss for a vocabulary of ``num_prompts`` (grounding K changes per batch)."""
        if getattr(default, "num_classes", num_prompts) == num_prompts:
            return default
        if num_prompts not in self._losses:
            from detectkit.losses import build_loss

            self._losses[num_prompts] = build_loss(self.loss_name, num_prompts, **self.loss_kwargs)
        return self._losses[num_prompts]


def attach_world(
    model: nn.Module,
    class_names: Sequence[str] | None,
    text_encoder: str | Path | TextEncoder | None = None,
    prompt_tuning: bool = False,
    loss: str = "v8",
    loss_kwargs: dict[str, Any] | None = None,
    new_classes: Sequence[str] | None = None,
) -> WorldTraining | None:
    """A :class:`WorldTraining` for a YOLO-World model, ``None`` for other detectors (which
    must not be given text options)."""
    if not isinstance(model, YoloWorld):
        if text_encoder is not None or prompt_tuning or new_classes:
            raise ValueError(
                f"text_encoder / prompt_tuning / new_classes are YOLO-World options; "
                f"{type(model).__name__} takes no prompts"
            )
        return None
    return WorldTraining(model, class_names, text_encoder, prompt_tuning, loss, loss_kwargs, new_classes)
