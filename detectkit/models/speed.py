"""Speed options shared by training and inference: channels_last memory format and torch.compile.

Both are opt-in and leave results equal within float tolerance (tests/test_speed_options.py):

* ``channels_last``: parameters (and so activations) in NHWC. oneDNN (CPU) and cuDNN (tensor
  cores) run convolutions natively in that layout; NCHW tensors are reordered on every call.
* ``compile``: ``torch.compile`` (inductor) of the detector's forward. ``True`` or a dict of
  ``torch.compile`` keyword arguments (``mode``, ``dynamic``, ``fullgraph``, ``backend``,
  ``options``). The first call of each input shape pays the compile time.

The compiled callable is kept outside the module tree (:class:`CompiledForward`): the module's
``state_dict``, its checkpoints and its EMA copies stay those of the plain model, and a copy
compiles again for its own parameters instead of calling the original's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = ["CompileOption", "CompiledForward", "SpeedConfig", "compile_options", "set_channels_last"]

#: ``False``/``None`` (eager), ``True`` (inductor defaults) or ``torch.compile`` keyword arguments
CompileOption = bool | Mapping[str, Any] | None


@dataclass(frozen=True)
class SpeedConfig:
    """The speed options travel together (``model.speed`` in a recipe): they change time, not results.

    ``channels_last``: NHWC parameters and activations. ``compile``: ``True`` or a dict of
    ``torch.compile`` arguments (``{mode: max-autotune, dynamic: true}``).
    """

    channels_last: bool = False
    compile: bool | dict[str, Any] = False

_COMPILE_KEYS = frozenset(inspect.signature(torch.compile).parameters) - {"model"}


def compile_options(compile: CompileOption) -> dict[str, Any] | None:
    """``None`` when compile is off, else the ``torch.compile`` keyword arguments (checked)."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {}
    if not isinstance(compile, Mapping):
        raise TypeError(f"compile must be a bool or a dict of torch.compile arguments, got {compile!r}")
    unknown = sorted(set(compile) - _COMPILE_KEYS)
    if unknown:
        raise ValueError(f"compile: unknown torch.compile arguments {unknown}; allowed: {sorted(_COMPILE_KEYS)}")
    return dict(compile)


#: convolutions reading this few channels (the RGB stem) stay NCHW, and so do the images: torch
#: 2.14.1 (CPU) frees memory twice in the backward of a 1x1 stride-2 convolution over a 3-4
#: channel input in channels_last (YOLO-NAS's stem). Reproducer: ``x = torch.rand(2, 3, 64, 64)
#: .to(memory_format=torch.channels_last).requires_grad_(); F.conv2d(x, torch.randn(48, 3, 1, 1),
#: stride=2).sum().backward()`` aborts the process.
#: The stem's output is NCHW; the next convolution's channels_last weights turn the rest NHWC.
STEM_CHANNELS = 4


def set_channels_last(model: nn.Module) -> nn.Module:
    """Convert the 4-D parameters and buffers to channels_last in place, except those of
    convolutions over ``<= STEM_CHANNELS`` input channels (see above). Parameter objects are kept,
    so an optimizer built before still holds them."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels <= STEM_CHANNELS:
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor is not None and tensor.dim() == 4 and not tensor.is_contiguous(memory_format=torch.channels_last):
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return model


class CompiledForward:
    """``torch.compile`` of a module's call, made on first use and redone when the module object
    changes (e.g. an architecture replay swapped it). Not an ``nn.Module``: it never enters a
    ``state_dict``; a deep copy (EMA, ``copy.deepcopy``) and a pickle keep only the options."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options = dict(options or {})
        self._target: nn.Module | None = None
        self._fn: Callable[..., Any] | None = None

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self._target is not module or self._fn is None:
            self._fn = torch.compile(module, **self.options)
            self._target = module
        return self._fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> CompiledForward:
        return CompiledForward(self.options)

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.get("options"))

    def __repr__(self) -> str:
        return f"CompiledForward({self.options})"
