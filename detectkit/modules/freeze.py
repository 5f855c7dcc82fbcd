"""Which parameters train, and at which learning rate: ``model.freeze`` and ``model.optim.lr_mult``.

Both take patterns over the detector's parameter names (``model.named_parameters()``): a module
prefix (``backbone`` matches ``backbone.stem.conv.weight``) or an fnmatch pattern
(``backbone.stage[12].*``, ``*.bn.*``). Fine-tuning a pretrained detector on a small dataset
usually freezes the backbone or trains it at a tenth of the lr; ultralytics' ``freeze=`` and
mmdet's ``frozen_stages`` / ``paramwise_cfg`` do the same.

Decisions:

* A frozen parameter has ``requires_grad=False`` and is left out of the optimizer.
* Normalisation layers whose parameters are all frozen run in eval mode during training: their
  running statistics stay those of the loaded weights, so a frozen backbone computes exactly the
  features it was trained with (detectron2's FrozenBatchNorm, mmdet's ``norm_eval``).
* The patterns are applied again whenever the optimizer is built, so parameters that pruning
  or fusion replaced (new tensors) stay frozen, and a resumed run freezes the same ones.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

import torch.nn as nn

from detectkit.errors import UserError

__all__ = ["NORM_TYPES", "matches", "freeze_parameters", "frozen_norms", "lr_multiplier", "module_patterns"]

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def matches(name: str, pattern: str) -> bool:
    """``name`` is ``pattern``, lies under the module ``pattern``, or matches it as an fnmatch pattern."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def _check_patterns(names: Sequence[str], patterns: Iterable[str], where: str, model: nn.Module) -> None:
    """A pattern that matches nothing is a typo: name it with the model's top-level modules."""
    for pattern in patterns:
        if not any(matches(n, pattern) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise UserError(f"{where}: {pattern!r} matches no parameter of {type(model).__name__} "
                            f"(its modules: {', '.join(tops)}; give a module prefix such as "
                            f"'backbone' or an fnmatch pattern such as 'backbone.stage1.*')")


def freeze_parameters(model: nn.Module, patterns: Sequence[str], where: str = "model.freeze") -> list[str]:
    """Set ``requires_grad=False`` on every parameter matching one of ``patterns``; returns their names."""
    named = list(model.named_parameters())
    _check_patterns([n for n, _ in named], patterns, where, model)
    frozen = []
    for name, p in named:
        if any(matches(name, pat) for pat in patterns):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def frozen_norms(model: nn.Module) -> list[nn.Module]:
    """Normalisation layers with parameters, all of them frozen (they run in eval mode)."""
    out = []
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, NORM_TYPES) and params and not any(p.requires_grad for p in params):
            out.append(m)
    return out


def lr_multiplier(name: str, lr_mult: Mapping[str, float]) -> tuple[str | None, float]:
    """The first ``lr_mult`` pattern matching parameter ``name`` and its multiplier (``(None, 1.0)``: none)."""
    for pattern, mult in lr_mult.items():
        if matches(name, pattern):
            return pattern, float(mult)
    return None, 1.0


def module_patterns(patterns: Sequence[str]) -> list[str]:
    """fnmatch patterns over MODULE names covering ``patterns`` (a prefix ``backbone`` is the module
    itself and everything under it): what pruning keeps whole."""
    return [q for p in patterns for q in (p, f"{p}.*")]
