"""DetectionModule: the one LightningModule that trains, validates and predicts every detector."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.fabric.utilities.warnings import PossibleUserWarning

from detectkit.configs import as_group, group_dict, register_moves, regroup
from detectkit.models.outputs import HeadOutput
from detectkit.models.speed import (
    CompiledForward,
    SpeedConfig,
    compile_options,
    set_channels_last,
)
from detectkit.modules.freeze import NORM_TYPES, freeze_parameters, frozen_norms, lr_multiplier
from detectkit.modules.metrics import build_map_metric, letterbox_info, summarize_map
from detectkit.modules.schedule import OptimConfig
from detectkit.ops.nms import PostprocessConfig, postprocess
from detectkit.predict.step import detect_batch, to_input

# The mAP values logged in _log_map are already global (one evaluation of the states gathered from
# every rank), so Lightning's epoch-level "use sync_dist=True" advice is a false alarm for them;
# it is silenced for those keys alone (sync_dist=True would add an all-reduce per key per epoch).
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/",
                        category=PossibleUserWarning)

__all__ = ["DetectionModule", "ExtraLoss", "LossTermRegistry", "OptimConfig", "param_groups"]

#: validation post-processing of SG's COCO recipe (``PPYoloEPostPredictionCallback``)
VAL_POSTPROCESS = PostprocessConfig(conf=0.01, iou=0.7, top_k=1000, max_det=300)

#: where the flat arguments of before the grouping went (old recipes, old checkpoints' hparams)
MOVED_HPARAMS = register_moves("model", {
    **{k: f"optim.{k}" for k in ("lr", "weight_decay", "betas", "warmup_steps", "warmup_initial_lr",
                                 "final_lr_ratio", "warmup_epochs")},
    **{f"val_{k}": f"val_postprocess.{k}" for k in ("conf", "iou", "top_k", "max_det")},
    **{f"predict_{k}": f"predict_postprocess.{k}" for k in ("conf", "iou", "max_det")},
    "channels_last": "speed.channels_last", "compile": "speed.compile",
})

@runtime_checkable
class ExtraLoss(Protocol):
    """A loss term added to the detection loss inside ``training_step`` (same autocast as the
    student's forward): returns the term and scalars to log (e.g. knowledge distillation)."""

    def __call__(
        self, module: pl.LightningModule, batch: Any, images: torch.Tensor, head: HeadOutput
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


@runtime_checkable
class LossTermRegistry(Protocol):
    """What accepts extra loss terms (``DetectionModule``): callbacks register in ``setup``."""

    def add_loss_term(self, name: str, fn: ExtraLoss) -> None: ...

    def remove_loss_term(self, name: str) -> None: ...


@runtime_checkable
class DistillationHost(Protocol):
    """What trains distillation feature adapters with the student (``DetectionModule``): a declared
    submodule slot, so that the adapters are saved, restored on resume, moved and optimised."""

    distill_adapters: nn.ModuleList | None

    def set_distill_adapters(self, adapters: nn.ModuleList | None) -> None: ...


class _LossTerms(dict):
    """name -> ExtraLoss. Deep copies share the terms: an EMA copy of the module
    (``AveragedModel`` deep-copies it) never trains, and copying a term would clone its teacher."""

    def __deepcopy__(self, memo: dict) -> _LossTerms:
        return _LossTerms(self)


def param_groups(
    module: nn.Module, weight_decay: float, lr: float | None = None, lr_mult: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: ``decay`` (conv/linear weights) and ``no_decay`` (biases, norm params), each
    split once more per ``lr_mult`` pattern (``backbone/decay`` at ``lr * lr_mult["backbone"]``).

    SG's ``zero_weight_decay_on_bias_and_bn`` (``_get_no_decay_param_ids``): every parameter of a
    norm layer and every module's ``bias`` get no weight decay; everything else (including
    1-element scales such as YOLO-NAS's bottleneck ``alpha``) does. Frozen parameters
    (``requires_grad=False``) are left out. Each group records its ``lr_mult`` so the schedule
    scales the whole curve, warm-up included.
    """
    groups: dict[tuple[str | None, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            # a parameter may opt out (``p.no_weight_decay = True``: YOLO-World's fixed base vocabulary)
            decay = not (isinstance(mod, NORM_TYPES) or name == "bias" or getattr(p, "no_weight_decay", False))
            key, mult = lr_multiplier(f"{mod_name}.{name}" if mod_name else name, lr_mult or {})
            group = groups.get((key, decay))
            if group is None:
                label = "decay" if decay else "no_decay"
                group = groups[(key, decay)] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                "name": f"{key}/{label}" if key else label, "lr_mult": mult}
                if lr is not None:
                    group["lr"] = lr * mult
            group["params"].append(p)
    # a fixed order (resume matches optimizer state by group position): default groups first
    order = [(None, True), (None, False)] + [(k, d) for k in (lr_mult or {}) for d in (True, False)]
    return [groups[k] for k in order if k in groups]


class DetectionModule(pl.LightningModule):
    """Train/validate/test/predict a detectkit ``Detector`` with the super-gradients recipe.

    Args:
        model: a registry name (``detectkit.list_models()``) or a built ``Detector``.
        num_classes: set once here; reaches the model, the loss and the metric. The CLI links it
            from ``data.num_classes``. ``None`` keeps the built model's / the registry default.
        class_names: names for per-class AP logging and drawn predictions (CLI: from the data).
        model_kwargs: extra builder arguments for a registry name.
        checkpoint: weights for the registry builder (e.g. super-gradients COCO weights).
        loss: ``detectkit.losses`` name; default the model family's ``default_loss``.
        optim: AdamW and the warm-up + cosine schedule (:class:`OptimConfig`; recipe block
            ``model.optim``; SG ``LinearBatchLRWarmup``/``LinearEpochLRWarmup`` + ``CosineLRScheduler``).
        val_postprocess: post-processing for mAP (SG's COCO recipe: conf 0.01, NMS keeps up to 300
            boxes an image). The mAP then scores each image's top 100 by score, COCO's
            ``maxDets=(1, 10, 100)`` and its 100-detections-an-image result rule (see
            :mod:`detectkit.modules.metrics`), so boxes 101-300 never change ``val/map``.
        predict_postprocess: post-processing for ``predict``; ``None`` keeps the model's own
            (``model.inference.postprocess``, from its checkpoint), so ``predict_step`` and
            ``model.predict`` agree.
        text_encoder, prompt_tuning: YOLO-World only (see :mod:`detectkit.modules.world`): the
            encoder that turns ``class_names`` into prompts at setup (CLIP folder/hub id in the
            local cache, ``.pt`` embeddings file; default ``$DETECTKIT_CLIP`` / HF cache), and
            learning only the prompt embeddings with the detector frozen.
        new_classes: YOLO-World k-shot: names appended as learnable embeddings to the vocabulary
            of ``checkpoint`` (trained on the base classes), which stays fixed with the whole
            detector, so the base classes' outputs do not change; ``class_names`` (the data) are
            the base names then these, ``num_classes`` counts both.
        speed: :class:`~detectkit.models.speed.SpeedConfig`. ``speed.channels_last`` runs the
            detector in NHWC memory format (parameters and images); results equal the default
            within float tolerance. Faster where the convolution library prefers it (cuDNN tensor
            cores; measure on CPU: ``benchmarks/bench_train_step.py``). ``speed.compile``:
            ``torch.compile`` the detector's forward for training and evaluation: ``True`` or a
            dict of ``torch.compile`` arguments (e.g. ``{"mode": "max-autotune", "dynamic":
            true}``; multi-scale training recompiles per size unless dynamic). The compiled call
            shares the parameters; checkpoints and EMA copies stay plain.
        freeze: parameters that do not train: module prefixes (``[backbone]``) or fnmatch patterns
            over the detector's parameter names (``[backbone.stem.*, "*.bn.*"]``); their norm
            layers keep their running statistics (see :mod:`detectkit.modules.freeze`). Per-group
            learning rates: ``optim.lr_mult`` (``{backbone: 0.1}``).
    """

    def __init__(
        self,
        model: str | nn.Module = "yolo_nas_s",
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        loss: str | None = None,
        loss_kwargs: dict[str, Any] | None = None,
        optim: OptimConfig | None = None,
        val_postprocess: PostprocessConfig = VAL_POSTPROCESS,
        predict_postprocess: PostprocessConfig | None = None,
        text_encoder: str | None = None,
        prompt_tuning: bool = False,
        new_classes: Sequence[str] | None = None,
        speed: SpeedConfig | None = None,
        freeze: Sequence[str] | None = None,
        **legacy: Any,
    ) -> None:
        super().__init__()
        groups = regroup("DetectionModule", legacy, MOVED_HPARAMS, {
            "optim": as_group(optim, OptimConfig, "model.optim"),
            "val_postprocess": as_group(val_postprocess, PostprocessConfig, "model.val_postprocess"),
            "predict_postprocess": (None if predict_postprocess is None else
                                    as_group(predict_postprocess, PostprocessConfig, "model.predict_postprocess"),
                                    PostprocessConfig),
            "speed": as_group(speed, SpeedConfig, "model.speed"),
        })
        self.optim: OptimConfig = groups["optim"]
        self._val_post: PostprocessConfig = groups["val_postprocess"]
        self._predict_post: PostprocessConfig | None = groups["predict_postprocess"]
        # hyper-parameters as plain data: checkpoints stay readable by the safe loader
        optim, val_postprocess = group_dict(self.optim), group_dict(self._val_post)
        predict_postprocess = group_dict(self._predict_post)
        self.speed: SpeedConfig = groups["speed"]
        speed = group_dict(self.speed)
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        if isinstance(model, str):
            from detectkit.checkpoint import create_model  # also a detectkit .ckpt to fine-tune from

            kw = dict(model_kwargs or {})
            if num_classes is not None:
                # k-shot: the data counts base + new classes, the base checkpoint only the base ones
                kw["num_classes"] = num_classes - len(new_classes or [])
            self.model = create_model(model, checkpoint=checkpoint, **kw)
        else:
            if num_classes is not None and getattr(model, "num_classes", num_classes) != num_classes:
                raise ValueError(f"num_classes={num_classes} but the given model has {model.num_classes} classes")
            self.model = model
        from detectkit.modules.world import attach_world

        # YOLO-World: K follows class_names, prompts encoded at setup, grounding batches (else None)
        self.world = attach_world(
            self.model, class_names, text_encoder, prompt_tuning, loss or getattr(self.model, "default_loss", "v8"), loss_kwargs,
            new_classes,
        )
        #: ``model.freeze`` patterns, applied now and again each time the optimizer is built
        self.freeze = [str(p) for p in (freeze or [])]
        self.apply_freeze()
        self.num_classes = int(self.model.num_classes)
        if class_names is not None:
            if len(class_names) != self.num_classes:
                raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
            self.model.class_names = list(class_names)
        self.class_names = list(getattr(self.model, "class_names", [str(i) for i in range(self.num_classes)]))

        from detectkit.losses import build_loss

        self.loss_name = loss or getattr(self.model, "default_loss", "ppyoloe")
        self.criterion = build_loss(self.loss_name, self.num_classes, **(loss_kwargs or {}))
        self.val_map = build_map_metric()
        self.test_map = build_map_metric()
        #: architecture ops (pruning, quantization) applied to ``self.model`` in order; saved in the
        #: checkpoint record and replayed on load (see ``detectkit.checkpoint.ArchitectureRecorder``)
        self.architecture: list[dict[str, Any]] = []
        self._restore_listeners: list[Callable[[Mapping[str, Any]], None]] = []
        #: extra loss terms by name, added to the detection loss in ``training_step`` in order
        self.loss_terms: dict[str, ExtraLoss] = _LossTerms()
        #: 1x1 feature adapters a distillation callback trains with the student (None: no feature
        #: KD); declared here so they are saved, restored, moved and optimised with the module
        self.distill_adapters: nn.ModuleList | None = None
        #: speed options (see :mod:`detectkit.models.speed`); the model is converted lazily, so a
        #: model swapped by an architecture replay is converted too
        self.channels_last = bool(self.speed.channels_last)
        options = compile_options(self.speed.compile)
        self._compiled = CompiledForward(options) if options is not None else None
        # the model channels_last was last applied to, in a list so nn.Module does not register it
        self._layout_of: list[nn.Module] = []

    def apply_freeze(self) -> list[str]:
        """Freeze the parameters ``freeze`` names (again: pruning and fusion make new tensors)."""
        if not self.freeze:
            return []
        frozen = freeze_parameters(self.model, self.freeze)
        self.train(self.training)  # frozen norm layers to eval mode
        return frozen

    def train(self, mode: bool = True) -> DetectionModule:
        """Train mode, except the frozen norm layers (their running statistics stay as loaded)."""
        super().train(mode)
        if mode and getattr(self, "freeze", None):
            for m in frozen_norms(self.model):
                m.eval()
        return self

    def setup(self, stage: str) -> None:
        self._prepare_model()
        if self.world is not None:  # encode the class names (no-op when the vocabulary already holds them)
            self.world.setup()
            self.class_names = list(self.model.class_names)

    def on_fit_end(self) -> None:
        if self.world is not None and (self.world.prompt_tuning or self.world.new_classes):
            self.world.finish_prompt_tuning()

    # ------------------------------------------------------------------ steps
    def _prepare_model(self, full: bool = False) -> None:
        """Apply ``channels_last`` to the current model: on every call when the model object was
        replaced (an architecture replay), and on ``full`` (each epoch start) in any case, since a
        pruning step swaps the weights of the same modules for new NCHW tensors."""
        if self.channels_last and (full or not self._layout_of or self._layout_of[0] is not self.model):
            set_channels_last(self.model)
            self._layout_of = [self.model]

    def on_train_epoch_start(self) -> None:  # after the callbacks' hook of the same name (pruning)
        self._prepare_model(full=True)

    def run_model(self, images: torch.Tensor, **inputs: Any) -> Any:
        """The detector's forward with this module's speed options (channels_last, compile)."""
        if self.channels_last:  # images stay NCHW (see detectkit.models.speed.STEM_CHANNELS)
            self._prepare_model()
        if self._compiled is not None:
            return self._compiled(self.model, images, **inputs)
        return self.model(images, **inputs)

    def forward(self, images: torch.Tensor) -> Any:
        return self.run_model(images)

    @staticmethod
    def _images(batch: dict[str, Any]) -> torch.Tensor:
        images = batch["images"]
        if images.dtype == torch.uint8:  # the DataModule normally converts in on_after_batch_transfer
            images = images.float().div_(255.0)
        return images

    def compute_loss(
        self, head: HeadOutput, targets: torch.Tensor, batch_size: int, class_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict]:
        """The loss in fp32 whatever the autocast precision (assignment and IoU need the range).
        ``class_mask [B,K]``: prompts that exist per image (YOLO-World grounding batches)."""
        head = head._replace(cls_logits=head.cls_logits.float(), reg_distri=head.reg_distri.float())
        criterion = self.criterion
        if self.world is not None:
            criterion = self.world.criterion_for(head.cls_logits.shape[-1], criterion)
        with torch.autocast(device_type=self.device.type, enabled=False):
            if class_mask is None:
                return criterion(head, targets.float(), batch_size)
            return criterion(head, targets.float(), batch_size, class_mask=class_mask)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        images = self._images(batch)
        inputs = self.world.model_inputs(batch, images.device) if self.world is not None else {}
        head = self.run_model(images, **inputs)
        total, components = self.compute_loss(head, batch["targets"], images.shape[0], inputs.get("text_mask"))
        for fn in self.loss_terms.values():  # registered with add_loss_term (e.g. KnowledgeDistillation)
            extra, extra_logs = fn(self, batch, images, head)
            total, components = total + extra, {**(components or {}), **extra_logs}
        out: dict[str, Any] = {"loss": total}
        logs = {}
        for k, v in (components or {}).items():
            if k == "image_losses":
                out["image_losses"] = v.detach()
            elif torch.is_tensor(v) and v.numel() == 1:
                logs[f"train/{k}"] = v.detach().reshape(()).float()  # no float(v): that syncs the GPU per term
            elif isinstance(v, float | int):
                logs[f"train/{k}"] = float(v)
        logs["train/loss"] = total.detach()
        self._log_train(logs, images.shape[0])
        self.log("loss", total.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return out

    def _log_train(self, logs: dict[str, Any], batch_size: int) -> None:
        """Losses as ``<name>_step`` (this rank's value, like Lightning's ``on_step`` logging; also
        as ``<name>`` in ``callback_metrics``) and ``<name>_epoch`` (the epoch mean over every rank: ``sync_dist`` reduces once at epoch end,
        not per step), plus the learning rate of each optimizer param group as ``train/lr_<group>``.

        The split is what ``on_step=True, on_epoch=True`` would name the values, without Lightning's
        epoch-level ``sync_dist`` warning under DDP and without an all-reduce per step. The learning
        rate is logged here rather than by ``LearningRateMonitor`` because that callback needs a
        logger (it raises without one) and bypasses ``self.log``, so the run folder's results.csv,
        the progress bar and ``trainer.callback_metrics`` would not see it; every fit logs it.
        """
        self.log_dict({f"{k}_step": v for k, v in logs.items()}, on_step=True, on_epoch=False, batch_size=batch_size)
        # the bare names for callbacks (``trainer.callback_metrics["train/loss"]``), not sent to loggers
        self.log_dict(logs, on_step=True, on_epoch=False, logger=False, batch_size=batch_size)
        self.log_dict({f"{k}_epoch": v for k, v in logs.items()}, on_step=False, on_epoch=True, sync_dist=True,
                      batch_size=batch_size)
        if self._trainer is not None:
            lrs: dict[str, float] = {}
            for i, opt in enumerate(self.trainer.optimizers):
                for j, group in enumerate(opt.param_groups):
                    name = str(group.get("name") or (j if len(self.trainer.optimizers) == 1 else f"{i}_{j}"))
                    lrs[f"train/lr_{name}"] = float(group["lr"])
            if lrs:
                self.log_dict(lrs, on_step=True, on_epoch=False, batch_size=batch_size)

    @property
    def val_postprocess(self) -> PostprocessConfig:
        """Post-processing for validation/test mAP (the ``val_postprocess`` argument)."""
        return self._val_post

    @property
    def predict_postprocess(self) -> PostprocessConfig:
        """Post-processing for ``predict_step``: the ``predict_postprocess`` argument, else the model's own."""
        if self._predict_post is not None:
            return self._predict_post
        return getattr(getattr(self.model, "inference", None), "postprocess", None) or PostprocessConfig()

    @torch.no_grad()
    def detect(self, images: torch.Tensor, config: PostprocessConfig | None = None) -> list[torch.Tensor]:
        """Eval-mode forward + the one post-processing (default :attr:`val_postprocess`):
        per image ``[N,6]`` in input pixels."""
        config = config or self.val_postprocess
        boxes, scores = self.run_model(images)
        return postprocess(boxes.float(), scores.float(), **config.to_dict())

    def _eval_step(self, batch: dict[str, Any], metric: Any) -> None:
        dets = self.detect(self._images(batch), self.val_postprocess)
        metric.update(dets, batch["meta"], letterboxed=True)  # one array per batch, original pixels

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_map)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_map)

    def _log_map(self, metric: Any, prefix: str) -> dict[str, float]:
        # one faster-coco-eval run on the states gathered across ranks (no sync_dist needed); a
        # callback that already called metric.compute()/pr_curve()/confusion_matrix() this epoch
        # gets the same cached run, which stays readable as metric.last_result after the reset
        summary = summarize_map(metric.compute(), self.class_names)
        metric.reset()
        for k, v in summary.items():
            self.log(f"{prefix}/{k}", v, prog_bar=k == "map_50")
        return summary

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Per image: ``meta`` plus ``boxes`` (original pixels), ``scores``, ``labels`` and
        ``best_score`` (before the threshold), from the one batch step of ``model.predict``."""
        metas = batch["meta"]
        dets = detect_batch(self.run_model, to_input(batch["images"]), [letterbox_info(m) for m in metas],
                            self.predict_postprocess)
        return [{"meta": meta, "boxes": det.boxes, "scores": det.scores, "labels": det.labels,
                 "best_score": det.best_score} for det, meta in zip(dets, metas)]

    # ----------------------------------------------------------- loss terms
    def add_loss_term(self, name: str, fn: ExtraLoss) -> None:
        """Add ``fn``'s term to the training loss from now on (replaces a term of the same name)."""
        if not callable(fn):
            raise TypeError(f"loss term {name!r} must be callable (module, batch, images, head) -> (loss, logs)")
        self.loss_terms[name] = fn

    def remove_loss_term(self, name: str) -> None:
        self.loss_terms.pop(name, None)

    # ----------------------------------------------------------- checkpoints
    def record_architecture(self, op: dict[str, Any]) -> None:
        """Append an architecture change (``{"op": "prune" | "quantize", ...}``) made to ``self.model``."""
        self.architecture.append(dict(op))

    def set_distill_adapters(self, adapters: nn.ModuleList | None) -> None:
        """Install the distillation adapters, or replace them (the student's widths changed)."""
        self.distill_adapters = adapters

    def add_restore_listener(self, fn: Callable[[Mapping[str, Any]], None]) -> None:
        """``fn(checkpoint)`` runs after a checkpoint's architecture was replayed, before the weights
        load (e.g. distillation adapters sized to a pruned student)."""
        self._restore_listeners.append(fn)

    def inference_defaults(self) -> Any:
        """What predict/export/serve should use: the validation input and letterbox of the data this
        module is trained on, and its predict thresholds."""
        from detectkit.models.base import InferenceDefaults

        base = getattr(self.model, "inference", None) or InferenceDefaults()
        post = self.predict_postprocess
        dm = self._trainer.datamodule if self._trainer is not None else None
        size = getattr(dm, "image_size", None)
        if isinstance(size, int):  # the validation letterbox: fit inside, centred as val_center says
            return InferenceDefaults(image_size=(size, size), longest=None, center=bool(getattr(dm, "val_center", True)),
                                     pad_value=114, postprocess=post)
        return InferenceDefaults(image_size=base.image_size, longest=base.longest, center=base.center,
                                 pad_value=base.pad_value, postprocess=post)

    def checkpoint_record(self) -> dict[str, Any]:
        """The ``checkpoint["detectkit"]`` record of this module's detector (digest not yet set)."""
        from detectkit.checkpoint import build_record

        hp = self.hparams
        dm = self._trainer.datamodule if self._trainer is not None else None
        cats = getattr(dm, "category_ids", None)  # the dataset's category id per label, when it has them
        return build_record(
            self.model, name=hp.get("model") if isinstance(hp.get("model"), str) else None,
            # the builder's canonical arguments (e.g. an architecture dict rather than its YAML path)
            model_kwargs=getattr(self.model, "registry_kwargs", hp.get("model_kwargs")) if isinstance(hp.get("model"), str) else None,
            class_names=self.class_names, category_ids=cats if cats is not None else getattr(self.model, "category_ids", None),
            architecture=self.architecture, inference=self.inference_defaults(),
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this last (after callbacks and hyper-parameters): the digest covers it all
        from detectkit.checkpoint import RECORD_KEY, seal

        checkpoint[RECORD_KEY] = self.checkpoint_record()
        seal(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Verify the content hash, then replay the recorded architecture on ``self.model`` so that
        Lightning's strict weight load that follows finds the same shapes and quantizers."""
        from detectkit.checkpoint import (
            RECORD_KEY,
            CheckpointError,
            architecture_from_callback_states,
            replay_architecture,
            verify,
        )

        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        verify(checkpoint, path)
        record = checkpoint.get(RECORD_KEY)
        ops = list(record.get("architecture", [])) if isinstance(record, Mapping) else \
            architecture_from_callback_states(checkpoint.get("callbacks"))
        done = len(self.architecture)
        if [o.get("op") for o in ops[:done]] != [o.get("op") for o in self.architecture]:
            raise CheckpointError(f"{path or 'checkpoint'}: its architecture ops {[o.get('op') for o in ops]} do not "
                                  f"continue this model's {[o.get('op') for o in self.architecture]}")
        replayed = len(ops) > done
        if replayed:
            self.model = replay_architecture(self.model, ops[done:])
            self.architecture = [dict(o) for o in ops]
        for fn in self._restore_listeners:
            fn(checkpoint)
        if replayed:  # last: the EMA copy must include what the listeners rebuilt
            self._refresh_weight_averaging()
        if self._trainer is not None and self._trainer.state.fn != "fit":
            # validate/test/predict write no checkpoints: the fit's ModelCheckpoint state would only
            # warn that its folder moved (the evaluation logs elsewhere); the weights are what counts
            for key in [k for k in checkpoint.get("callbacks") or {} if str(k).split("{")[0].endswith("Checkpoint")]:
                del checkpoint["callbacks"][key]

    def _refresh_weight_averaging(self) -> None:
        """An EMA copy made before the replay has the old architecture: re-create it from the new one."""
        if self._trainer is None:
            return
        from lightning.pytorch.callbacks import WeightAveraging

        for cb in self._trainer.callbacks:
            if isinstance(cb, WeightAveraging) and getattr(cb, "_average_model", None) is not None:
                cb.setup(self._trainer, self, "fit")

    # ------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.optim
        self.apply_freeze()
        groups = param_groups(self.model, opt.weight_decay, lr=opt.lr, lr_mult=opt.lr_mult)
        optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = opt.scheduler(optimizer, total, steps_per_epoch=max(1, total // epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
