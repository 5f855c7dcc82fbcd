"""What a candidate costs and how well it learns: parameters, MACs, measured latency, proxy mAP.

Latency is measured, not modelled: the candidate is fused to its deployment form, exported to ONNX
with :func:`detectkit.export.deploy.export_detector` and timed in onnxruntime on this machine's CPU
(optionally after onnxruntime's static INT8, :mod:`detectkit.export.ort_int8`), or built into a
TensorRT engine where TensorRT is installed. Proxy accuracy is a short training through the same
LightningCLI recipe that ``detectkit fit`` runs, so the proxy and the final training share data,
augmentation, loss and schedule.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from detectkit.models.yolo_nas.configs import YoloNASConfig


def build(cfg: YoloNASConfig, num_classes: int):
    """The candidate detector (random init) through the registry, as ``detectkit fit`` builds it."""
    from detectkit.registry import create_model

    return create_model("yolo_nas_custom", num_classes=num_classes, arch=cfg.to_dict())


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model, image_size: int) -> int:
    """Multiply-accumulates of one eval forward at ``image_size`` (torch's FlopCounterMode / 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    model.train(was)
    return int(counter.get_total_flops() // 2)


@dataclass
class LatencyConfig:
    """How latency is measured. ``backend``: ``onnxruntime`` (CPU) or ``tensorrt`` (needs TensorRT + a GPU).
    ``int8``: time onnxruntime's static QDQ INT8 graph (calibrated on ``calibration_batches`` random
    batches unless the search passes real images). Median of ``runs`` after ``warmup``."""

    backend: str = "onnxruntime"
    image_size: int | None = None  # None: the proxy training's image size
    batch_size: int = 1
    threads: int = 1
    warmup: int = 5
    runs: int = 30
    int8: bool = False
    calibration_batches: int = 4

    def __post_init__(self) -> None:
        if self.backend not in ("onnxruntime", "tensorrt"):
            raise ValueError(f"latency.backend must be 'onnxruntime' or 'tensorrt', got {self.backend!r}")


def export_candidate(model, path: str | os.PathLike, image_size: int, batch_size: int = 1) -> Path:
    """Deployment form (QARepVGG and Conv-BN fused) exported to ONNX, raw boxes/scores, static batch."""
    import copy

    from detectkit.export.deploy import ExportConfig, export_detector

    fused = copy.deepcopy(model).eval().fuse()
    export_detector(fused, path, ExportConfig(image_size=(image_size, image_size), batch_size=batch_size,
                                              dynamic_batch=False), check=False)
    return Path(path)


def _median_of(run_once: Callable[[], float], cfg: LatencyConfig) -> float:
    for _ in range(cfg.warmup):
        run_once()
    return float(statistics.median(run_once() for _ in range(cfg.runs)))


def onnxruntime_runner(path: str | os.PathLike, image_size: int, cfg: LatencyConfig) -> Callable[[], float]:
    """A callable that runs the graph at ``path`` once on onnxruntime CPU and returns its wall time (ms)."""
    import numpy as np

    from detectkit.export.onnx import ort_session

    sess = ort_session(path, cfg.threads)
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).random((cfg.batch_size, 3, image_size, image_size), dtype=np.float32)}

    def run_once() -> float:
        t = time.perf_counter()
        sess.run(None, feed)
        return (time.perf_counter() - t) * 1000

    return run_once


def time_onnxruntime(path: str | os.PathLike, image_size: int, cfg: LatencyConfig) -> float:
    """Median wall time (ms) of one onnxruntime CPU run of the graph at ``path``."""
    return _median_of(onnxruntime_runner(path, image_size, cfg), cfg)


def tensorrt_runner(path: str | os.PathLike, image_size: int, cfg: LatencyConfig) -> Callable[[], float]:
    """A callable that runs a TensorRT engine built from the ONNX graph (FP16, or INT8 with ``int8``)
    once and returns its GPU time (ms)."""
    from detectkit.export.tensorrt import tensorrt_available

    if not tensorrt_available():
        raise RuntimeError("latency.backend=tensorrt but TensorRT is not installed here (pip install tensorrt on a GPU machine)")
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(path).read_bytes()):
        raise RuntimeError(f"{path}: TensorRT could not parse the graph: {parser.get_error(0)}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    if cfg.int8:
        config.set_flag(trt.BuilderFlag.INT8)
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))
    context = engine.create_execution_context()
    buffers = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = tuple(engine.get_tensor_shape(name))
        buffers[name] = torch.empty(shape, device="cuda", dtype=torch.float32)
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.Stream()

    def run_once() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        context.execute_async_v3(stream.cuda_stream)
        end.record(stream)
        end.synchronize()
        return float(start.elapsed_time(end))

    run_once.keep = (engine, context, buffers)  # type: ignore[attr-defined]  # alive as long as the runner
    return run_once


def time_tensorrt(path: str | os.PathLike, image_size: int, cfg: LatencyConfig) -> float:
    """Median GPU latency (ms) of a TensorRT engine built from the ONNX graph (FP16, or INT8 with ``int8``)."""
    return _median_of(tensorrt_runner(path, image_size, cfg), cfg)


def _deployed_graph(model, tmp: Path, image_size: int, cfg: LatencyConfig, calibration: Sequence[Any] | None = None) -> Path:
    """The graph that is timed: the fused model in ONNX, onnxruntime's static INT8 graph with ``int8``."""
    import numpy as np

    onnx_path = export_candidate(model, tmp / "candidate.onnx", image_size, cfg.batch_size)
    if cfg.backend == "onnxruntime" and cfg.int8:
        from detectkit.export.ort_int8 import quantize_for_onnxruntime

        if calibration is None:
            rng = np.random.default_rng(0)
            calibration = [rng.random((cfg.batch_size, 3, image_size, image_size), dtype=np.float32)
                           for _ in range(cfg.calibration_batches)]
        onnx_path = quantize_for_onnxruntime(onnx_path, tmp / "candidate.int8.onnx", calibration)
    return onnx_path


def _runner(path: Path, image_size: int, cfg: LatencyConfig) -> Callable[[], float]:
    return (tensorrt_runner if cfg.backend == "tensorrt" else onnxruntime_runner)(path, image_size, cfg)


def measure_latency(model, image_size: int, cfg: LatencyConfig, workdir: str | os.PathLike | None = None,
                    calibration: Sequence[Any] | None = None) -> float:
    """Export, optionally quantize, and time ``model`` on the configured backend (ms per batch)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        return _median_of(_runner(_deployed_graph(model, Path(tmp), image_size, cfg, calibration), image_size, cfg), cfg)


def remeasure_latency(models: Mapping[Any, tuple[Any, int]], cfg: LatencyConfig, rounds: int = 10, runs: int = 5,
                      workdir: str | os.PathLike | None = None) -> dict[Any, dict[str, float]]:
    """Time several models back to back, interleaved (A B C A B C ...), in this one process.

    Why: the per-trial figure of a search is taken whenever the trial ran, next to whatever else the
    machine was doing then (the other workers, other users); interleaving exposes every model to the
    same conditions, so their differences are the models'. ``models``: key -> (model, image size).
    Each round runs every model ``runs`` times after one warmup pass of ``cfg.warmup`` runs each.
    Returns key -> ``{"median_ms", "min_ms", "rounds", "runs"}`` over all ``rounds x runs`` timings.
    """
    if rounds < 1 or runs < 1:
        raise ValueError(f"remeasure needs rounds >= 1 and runs >= 1, got rounds={rounds} runs={runs}")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        runners = {}
        for i, (key, (model, size)) in enumerate(models.items()):
            sub = Path(tmp) / str(i)
            sub.mkdir()
            runners[key] = _runner(_deployed_graph(model, sub, size, cfg), size, cfg)
        for run_once in runners.values():
            for _ in range(cfg.warmup):
                run_once()
        times: dict[Any, list[float]] = {k: [] for k in runners}
        for _ in range(rounds):
            for key, run_once in runners.items():
                times[key] += [run_once() for _ in range(runs)]
    return {k: {"median_ms": float(statistics.median(v)), "min_ms": float(min(v)), "rounds": rounds, "runs": runs}
            for k, v in times.items()}


@dataclass
class ProxyConfig:
    """The proxy training: ``recipe`` (a ``detectkit fit`` config) with ``overrides`` (CLI arguments,
    e.g. a smaller image size), trained ``epochs`` epochs of ``train_batches`` batches each and
    validated every epoch on ``val_batches`` batches (None: all)."""

    recipe: str = "experiments/quickstart.yaml"
    epochs: int = 2
    train_batches: int | None = 8
    val_batches: int | None = None
    overrides: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def short_fit_args(configs: Sequence[str], overrides: Sequence[str], root: str | os.PathLike,
                   epochs: int | None = None, train_batches: int | None = None,
                   val_batches: int | None = None) -> list[str]:
    """The LightningCLI arguments of a short, throw-away fit of a recipe: validated every epoch,
    no logger, progress bar or checkpoint folder of its own (``root`` is a temporary folder).
    ``epochs`` None keeps the recipe's ``trainer.max_epochs`` (after ``overrides``). Shared by the
    architecture search's proxy training and ``detectkit tune``'s trials."""
    args = [a for c in configs for a in ("--config", str(c))]
    args += [*overrides,
             "--trainer.check_val_every_n_epoch", "1",
             "--trainer.num_sanity_val_steps", "0",
             "--trainer.default_root_dir", str(root),
             "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false"]
    if epochs is not None:
        args += ["--trainer.max_epochs", str(epochs)]
    if train_batches is not None:
        args += ["--trainer.limit_train_batches", str(train_batches)]
    if val_batches is not None:
        args += ["--trainer.limit_val_batches", str(val_batches)]
    return args


def fit_args(proxy: ProxyConfig, arch: YoloNASConfig, root: str | os.PathLike) -> list[str]:
    """The LightningCLI arguments of one proxy training (the recipe + this architecture + the budget)."""
    arch_args = ["--model.model", "yolo_nas_custom", "--model.model_kwargs", json.dumps({"arch": arch.to_dict()})]
    return short_fit_args([proxy.recipe], [*proxy.overrides, *arch_args], root, proxy.epochs, proxy.train_batches,
                          proxy.val_batches)


class ShortFit:
    """A short fit through ``detectkit fit``'s LightningCLI, built (model, data, trainer) but not yet
    run. ``args(root)`` gives its LightningCLI arguments for the temporary folder ``root``."""

    def __init__(self, args: Callable[[str], list[str]], workdir: str | os.PathLike | None = None,
                 what: str = "recipe") -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        from detectkit.cli import DetectkitCLI

        self._tmp = tempfile.TemporaryDirectory(dir=workdir)
        argv = args(self._tmp.name)
        try:
            cli = DetectkitCLI(args=argv, run=False)
        except SystemExit as e:  # jsonargparse reports a bad recipe/override by exiting
            self._tmp.cleanup()
            raise ValueError(f"{what} does not parse (exit {e.code})") from None
        except BaseException:
            self._tmp.cleanup()
            raise
        self.trainer, self.module, self.data = cli.trainer, cli.model, cli.datamodule
        # a short fit keeps nothing on disk: the recipe's checkpoint callbacks are dropped
        self.trainer.callbacks[:] = [cb for cb in self.trainer.callbacks if not isinstance(cb, ModelCheckpoint)]
        self.image_size = int(self.data.image_size)

    def close(self) -> None:
        self._tmp.cleanup()


class ProxyRun(ShortFit):
    """One proxy training, built (model at random init, data, trainer) but not yet run: the search
    measures the very model it will train before spending the training time."""

    def __init__(self, arch: YoloNASConfig, proxy: ProxyConfig, workdir: str | os.PathLike | None = None) -> None:
        super().__init__(lambda root: fit_args(proxy, arch, root), workdir,
                         what=f"proxy recipe {proxy.recipe} with overrides {proxy.overrides}")


def prepare_proxy(arch: YoloNASConfig, proxy: ProxyConfig, workdir: str | os.PathLike | None = None) -> ProxyRun:
    return ProxyRun(arch, proxy, workdir)


def run_proxy(run: ShortFit, report: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train briefly; returns ``{"map", "map_50", "epochs", "images", "image_size", "seconds"}``.

    ``report(epoch, map)`` runs after every validation (the search's early stop raises from it).
    """
    import lightning as L

    class Reporter(L.Callback):
        # on_validation_end: after the module's epoch-end hook has logged this epoch's val/map
        def on_validation_end(self, trainer, pl_module) -> None:
            value = trainer.callback_metrics.get("val/map")
            if not trainer.sanity_checking and report is not None and value is not None:
                report(trainer.current_epoch, float(value))

    start = time.time()
    trainer = run.trainer
    trainer.callbacks.append(Reporter())
    trainer.fit(run.module, datamodule=run.data)
    metrics = {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {
        "map": metrics.get("map", 0.0),
        "map_50": metrics.get("map_50", 0.0),
        "epochs": trainer.current_epoch,
        "images": int(trainer.current_epoch * trainer.num_training_batches * run.data.loader.batch_size),
        "image_size": run.image_size,
        "seconds": round(time.time() - start, 1),
    }


def proxy_train(arch: YoloNASConfig, proxy: ProxyConfig, report: Callable[[int, float], None] | None = None,
                workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Build and run one proxy training (see :func:`run_proxy`)."""
    run = prepare_proxy(arch, proxy, workdir)
    try:
        return run_proxy(run, report)
    finally:
        run.close()
