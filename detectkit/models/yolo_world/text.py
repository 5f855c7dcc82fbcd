"""Class names -> L2-normalised text embeddings ``[N, 512]`` for YOLO-World.

The detector never sees text, only embeddings; these encoders produce them:

* :class:`CLIPTextEncoder`: Hugging Face CLIP (``openai/clip-vit-base-patch32`` = the
  ViT-B/32 text tower YOLO-World v2 was trained with), read from a local folder or the HF
  cache; nothing is downloaded at run time.
* :class:`OpenCLIPTextEncoder`: the same through ``open_clip`` (optional dependency).
* :class:`EmbeddingsFileEncoder`: a ``.pt`` dict ``{name: tensor[512]}`` (write one with
  :func:`save_embeddings`), for machines without CLIP.

:func:`encode_cached` memoises per vocabulary (encoder id + tuple of names).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from detectkit.errors import UserError

CLIP_B32 = "openai/clip-vit-base-patch32"


class TextEncoderUnavailable(UserError, RuntimeError):
    """The weights or package an encoder needs are not on this machine (the CLI prints one line)."""


def _hf_cache() -> str:
    """The Hugging Face hub cache folder transformers reads (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ...)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")


def clip_missing_message(source: str, err: BaseException) -> str:
    """One line: which CLIP is missing, where it was looked for, and the ways to provide it."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if Path(source).expanduser().exists():
        first = " ".join(str(err).split())[:160]
        return (f"CLIP text model folder {source} cannot be read ({type(err).__name__}: {first}); it needs the tokenizer "
                "and CLIPTextModelWithProjection files written by save_pretrained")
    where = "no such folder, and not" if os.sep in source and source.count("/") != 1 else "not"
    return (f"CLIP text model {source!r}: {where} in the local Hugging Face cache {_hf_cache()} (detectkit never "
            f"downloads at run time). Get it once with `huggingface-cli download {CLIP_B32}`"
            + (" (HF_HUB_OFFLINE=1 is set: unset it for that download)" if offline else "")
            + ", or set model.text_encoder / $DETECTKIT_CLIP to a CLIP folder (save_pretrained layout), or "
            "model.text_encoder to an embeddings .pt file (save_embeddings)")


class TextEncoder(ABC):
    """``encode(names) -> [N, dim]`` unit-norm embeddings; ``id`` names the encoder for caching."""

    dim: int = 512

    @property
    @abstractmethod
    def id(self) -> str: ...

    @abstractmethod
    def _embed(self, names: list[str]) -> torch.Tensor: ...

    def encode(self, names: Sequence[str]) -> torch.Tensor:
        names = _check_names(names)
        emb = self._embed(names).detach().float().cpu()
        if emb.shape != (len(names), self.dim):
            raise ValueError(
                f"{self.id} returned {tuple(emb.shape)} for {len(names)} names, expected dim {self.dim}"
            )
        return F.normalize(emb, dim=-1)


def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise TypeError("pass a list of class names, not a single string")
    names = list(names)
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"class names must be a non-empty list of non-empty strings, got {names!r}")
    return names


class CLIPTextEncoder(TextEncoder):
    """CLIP text tower via ``transformers`` (tokenizer + ``CLIPTextModelWithProjection``).

    ``source`` is a local folder (``save_pretrained`` layout) or a hub id looked up in the local
    HF cache only (``local_files_only=True``): this project never downloads at run time.
    """

    def __init__(
        self, source: str | Path = CLIP_B32, device: str | torch.device = "cpu", batch_size: int = 256
    ):
        try:
            from transformers import AutoTokenizer, CLIPTextModelWithProjection
        except ImportError as err:  # pragma: no cover - transformers is a declared extra
            raise TextEncoderUnavailable(
                f"YOLO-World's text encoder (CLIP {source}) needs transformers: pip install 'detectkit[text]', "
                "or set model.text_encoder to an embeddings .pt file (save_embeddings)"
            ) from err
        self.source = str(source)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source, local_files_only=True)
            self.model = CLIPTextModelWithProjection.from_pretrained(self.source, local_files_only=True)
        except (OSError, ValueError) as err:
            raise TextEncoderUnavailable(clip_missing_message(self.source, err)) from err
        self.model.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.dim = int(self.model.config.projection_dim)
        self.max_length = int(self.model.config.max_position_embeddings)

    @property
    def id(self) -> str:
        return f"hf-clip:{self.source}"

    @torch.no_grad()
    def _embed(self, names: list[str]) -> torch.Tensor:
        chunks = []
        for i in range(0, len(names), self.batch_size):
            tokens = self.tokenizer(
                names[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            chunks.append(self.model(**tokens).text_embeds)
        return torch.cat(chunks)


class OpenCLIPTextEncoder(TextEncoder):
    """CLIP text tower via ``open_clip`` (optional; weights must already be in its local cache)."""

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str = "openai", device: str = "cpu") -> None:
        try:
            import open_clip
        except ImportError as err:
            raise TextEncoderUnavailable(
                "OpenCLIPTextEncoder needs `pip install open_clip_torch`; or use CLIPTextEncoder (transformers) "
                "or EmbeddingsFileEncoder"
            ) from err
        try:
            model, _, _ = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device
            )
        except Exception as err:  # open_clip raises many types when weights are missing offline
            raise TextEncoderUnavailable(
                f"open_clip could not load {model_name}/{pretrained} locally: {err}"
            ) from err
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.name = f"{model_name}/{pretrained}"
        self.device = device
        self.dim = int(model.text_projection.shape[-1])

    @property
    def id(self) -> str:
        return f"open-clip:{self.name}"

    @torch.no_grad()
    def _embed(self, names: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(names).to(self.device))


class EmbeddingsFileEncoder(TextEncoder):
    """Look names up in a ``torch.save``-d dict ``{name: tensor[dim]}`` (no model needed)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"text embeddings file not found: {self.path}")
        from detectkit.checkpoint import read_checkpoint  # CheckpointError names the file and the problem

        table = read_checkpoint(self.path)
        if not isinstance(table, dict) or not table:
            raise ValueError(f"{self.path}: expected a non-empty dict {{name: tensor[dim]}}")
        dims = {tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in table.values()}
        if len(dims) != 1 or None in dims or len(next(iter(dims))) != 1:
            raise ValueError(
                f"{self.path}: every value must be a 1-D tensor of the same size, got shapes {dims}"
            )
        self.table = {str(k): v.float() for k, v in table.items()}
        self.dim = next(iter(dims))[0]
        self._stamp = self.path.stat().st_mtime_ns

    @property
    def id(self) -> str:
        return f"file:{self.path.resolve()}:{self._stamp}"

    def _embed(self, names: list[str]) -> torch.Tensor:
        missing = [n for n in names if n not in self.table]
        if missing:
            raise KeyError(f"{self.path} has no embedding for {missing}; it holds {len(self.table)} names")
        return torch.stack([self.table[n] for n in names])


def save_embeddings(path: str | Path, names: Sequence[str], encoder: TextEncoder) -> Path:
    """Encode ``names`` once and write an :class:`EmbeddingsFileEncoder` file."""
    names = _check_names(names)
    emb = encoder.encode(names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({n: e.clone() for n, e in zip(names, emb)}, path)
    return path


class TextEmbeddingCache:
    """LRU of vocabularies: ``(encoder.id, tuple(names)) -> [N, dim]``."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._store: OrderedDict[tuple[str, tuple[str, ...]], torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, encoder: TextEncoder, names: Sequence[str]) -> torch.Tensor:
        key = (encoder.id, tuple(_check_names(names)))
        if key in self._store:
            self.hits += 1
            self._store.move_to_end(key)
            return self._store[key].clone()
        self.misses += 1
        emb = encoder.encode(list(key[1]))
        self._store[key] = emb.clone()
        while len(self._store) > self.max_entries:
            self._store.popitem(last=False)
        return emb

    def clear(self) -> None:
        self._store.clear()


DEFAULT_CACHE = TextEmbeddingCache()


def encode_cached(
    encoder: TextEncoder, names: Sequence[str], cache: TextEmbeddingCache | None = None
) -> torch.Tensor:
    """``encoder.encode(names)``, memoised per vocabulary."""
    return (cache or DEFAULT_CACHE).get(encoder, names)


def default_text_encoder() -> TextEncoder:
    """CLIP ViT-B/32 from ``$DETECTKIT_CLIP`` (a local folder) or the local HF cache."""
    return CLIPTextEncoder(os.environ.get("DETECTKIT_CLIP", CLIP_B32))
