"""``detectkit benchmark --checkpoint X``: which deployment format is fastest here, at what accuracy.

For each format (PyTorch eager, PyTorch compiled with ``--compile``, ONNX Runtime FP32 and INT8,
OpenVINO FP32 and INT8, TorchScript, TensorRT on a CUDA machine): the file size, COCO mAP on
``--data`` (or, without it, the val metric the checkpoint records, said once), latency p50/p90
at batch 1 and throughput at ``--batch``, as a table and one JSON line.

Nothing here runs a network itself: the files come from the export functions (the cached raw
graph and IR of :mod:`detectkit.serve.backends`, :func:`~detectkit.export.ort_int8.quantize_for_onnxruntime`,
:func:`~detectkit.export.torchscript.export_torchscript`), each format runs through its server
backend (or, for TorchScript and ``torch.compile``, the module itself, which already maps images to
``(boxes, scores)``), and every timed call and every mAP batch is the one batch step
:func:`detectkit.predict.step.detect_batch` (network + post-processing + letterbox inverse), so the
numbers are what ``predict`` and ``serve`` get. INT8 is onnxruntime's static QDQ (``detectkit export
--int8 --int8-backend onnxruntime``) calibrated on validation images; OpenVINO INT8 runs that same
QDQ graph (its ONNX frontend turns Q/DQ pairs into int8 kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when the command runs, so `detectkit benchmark --help` is instant
    import numpy as np
    import torch
    import torch.nn as nn

__all__ = ["FORMATS", "BenchRow", "recorded_map", "format_table", "main"]

log = logging.getLogger(__name__)

#: every format, in table order: name -> what it is
FORMATS: dict[str, str] = {
    "torch": "PyTorch eager (Conv+BN fused)",
    "torch-compiled": "torch.compile of the same (opt-in: --compile)",
    "onnxruntime": "ONNX Runtime FP32",
    "onnxruntime-int8": "ONNX Runtime INT8 (static QDQ, calibrated on val images)",
    "openvino": "OpenVINO FP32 (compiled f32)",
    "openvino-int8": "OpenVINO INT8 (the same QDQ graph)",
    "torchscript": "TorchScript (traced)",
    "tensorrt": "TensorRT FP16 (CUDA)",
}
#: the package each runtime needs -> the line a row shows when it is absent
MISSING = {
    "onnxruntime": "not installed (pip install 'detectkit[export]')",
    "openvino": "not installed (pip install 'detectkit[openvino]')",
    "tensorrt": "not installed (needs the `tensorrt` package and a CUDA GPU: pip install tensorrt)",
}


@dataclass
class BenchRow:
    """One format's figures; ``status`` is ``ok`` or why the row has no numbers."""

    format: str
    status: str = "ok"
    file: str | None = None
    size_mb: float | None = None
    map: float | None = None
    map50: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    throughput: float | None = None  # images per second at --batch


def recorded_map(checkpoint: dict[str, Any]) -> tuple[str, float] | None:
    """The validation mAP a Lightning checkpoint carries: a ``ModelCheckpoint`` that monitored a
    ``map`` metric keeps its best score. None when no callback monitored one (the quickstart's
    keeps the newest epoch, without a monitor)."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if not str(key).startswith("ModelCheckpoint") or not isinstance(state, dict):
            continue
        monitor, score = state.get("monitor"), state.get("best_model_score")
        if monitor and "map" in str(monitor) and score is not None:
            return str(monitor), float(score)
    return None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--checkpoint", required=True, help="detectkit .ckpt (or any file detectkit.load reads)")
    p.add_argument("--data", help="validation set for mAP: a dataset folder or annotation file (COCO, YOLO data.yaml, "
                                  "VOC, CreateML); without it the checkpoint's recorded val metric is shown")
    p.add_argument("--split", default=None, help="split of --data (default: val, or the only one)")
    p.add_argument("--max-images", type=int, default=None, help="score only the first N images of the split")
    p.add_argument("--formats", default=",".join(f for f in FORMATS if f != "torch-compiled"),
                   help=f"comma-separated subset of {', '.join(FORMATS)} (default: all but torch-compiled)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile row (compiles for minutes on a CPU)")
    p.add_argument("--batch", type=int, default=8, help="batch size of the throughput figure (default: %(default)s)")
    p.add_argument("--runs", type=int, default=20, help="timed calls per figure (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads: torch.set_num_threads, onnxruntime "
                                                                "intra-op and OpenVINO inference threads")
    p.add_argument("--calib-images", type=int, default=32, help="validation images that calibrate INT8 (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the PyTorch and TensorRT rows")
    p.add_argument("--work-dir", default=None, help="keep the exported files here (default: a temporary folder)")
    return parser


def _selected(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in str(args.formats).split(",") if n.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        from detectkit.errors import suggest

        raise SystemExit(f"--formats: unknown format {unknown[0]!r}.{suggest(unknown[0], list(FORMATS))} "
                         f"Formats: {', '.join(FORMATS)}")
    if args.compile and "torch-compiled" not in names:
        names.insert(1 if "torch" in names else 0, "torch-compiled")
    return [n for n in FORMATS if n in names]  # table order


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch", "runs", "calib_images"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be 0 or more, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {args.threads}")
    if args.max_images is not None and args.max_images < 1:
        raise SystemExit(f"--max-images must be at least 1, got {args.max_images}")
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")


# ---------------------------------------------------------------------------- inputs
@dataclass
class _Inputs:
    """Letterboxed float batches for timing (batch 1 and --batch), their letterboxes, and the
    validation batches for mAP (``val``: (images, letterboxes, metas), None without --data)."""

    one: tuple[torch.Tensor, list]
    many: tuple[torch.Tensor, list]
    val: list[tuple[torch.Tensor, list, list[dict]]] | None
    calibration: list[np.ndarray] | None


def _val_dataset(args: argparse.Namespace, size: int):
    from detectkit.data.dataset import DetectionDataset
    from detectkit.data.formats.detect import canonical_split, open_dataset

    source = open_dataset(args.data)
    split = args.split
    if split is None and len(source.splits) > 1:
        split = next((s for s in source.splits if canonical_split(s) == "val"), None)
        if split is None:
            raise SystemExit(f"--data {args.data}: holds splits {source.splits} and none is 'val'; pass --split")
    records = source.load(split)
    if args.max_images is not None:
        records = dataclasses.replace(records, records=records.records[: args.max_images])
    return DetectionDataset(records, image_size=size, train=False)


def _batches(dataset, batch_size: int) -> list[tuple[torch.Tensor, list, list[dict]]]:
    from detectkit.data.collate import collate
    from detectkit.modules.metrics import letterbox_info
    from detectkit.predict.step import to_input

    out = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        out.append((to_input(batch["images"]), [letterbox_info(m) for m in batch["meta"]], batch["meta"]))
    return out


def _inputs(args: argparse.Namespace, size: int) -> _Inputs:
    """Timing batches from the validation images when there are some (real content: NMS sees real
    boxes), else uniform noise at the checkpoint's size."""
    import torch

    from detectkit.data.letterbox import LetterboxInfo

    if args.data is None:
        gen = torch.Generator().manual_seed(0)
        images = torch.rand((args.batch, 3, size, size), generator=gen)
        boxes = [LetterboxInfo(scale=1.0, pad_left=0, pad_top=0, orig_size=(size, size))] * args.batch
        return _Inputs(one=(images[:1], boxes[:1]), many=(images, boxes), val=None, calibration=None)
    val = _batches(_val_dataset(args, size), args.batch)
    images = torch.cat([b[0] for b in val])
    boxes = [lb for b in val for lb in b[1]]
    reps = math.ceil(args.batch / len(boxes))  # fewer images than --batch: repeat them
    many = (images.repeat(reps, 1, 1, 1)[: args.batch], (boxes * reps)[: args.batch])
    calibration = [images[i : i + 1].numpy() for i in range(min(args.calib_images, len(boxes)))]
    return _Inputs(one=(images[:1], boxes[:1]), many=many, val=val, calibration=calibration)


# ---------------------------------------------------------------------------- measuring
def _time(step: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    """Wall-clock milliseconds of ``runs`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def _measure(row: BenchRow, forward: Callable, inputs: _Inputs, post, args: argparse.Namespace) -> BenchRow:
    """Latency at batch 1, throughput at --batch, mAP on the validation batches: all through detect_batch."""
    import numpy as np

    from detectkit.modules.detector import VAL_POSTPROCESS
    from detectkit.modules.metrics import COCOMeanAveragePrecision
    from detectkit.predict.step import detect_batch

    one = _time(lambda: detect_batch(forward, inputs.one[0], inputs.one[1], post), args.runs, args.warmup)
    many = _time(lambda: detect_batch(forward, inputs.many[0], inputs.many[1], post), args.runs, args.warmup)
    row.p50_ms, row.p90_ms = (round(float(v), 2) for v in np.percentile(one, [50, 90]))
    row.throughput = round(args.batch / (statistics.median(many) / 1000.0), 1)
    if inputs.val is not None:
        metric = COCOMeanAveragePrecision()
        for images, boxes, metas in inputs.val:
            dets = detect_batch(forward, images, boxes, VAL_POSTPROCESS)
            preds = [{"boxes": d.boxes, "scores": d.scores, "labels": d.labels} for d in dets]
            targets = [{"boxes": m["boxes"], "labels": m["labels"], "iscrowd": m.get("iscrowd"),
                        "area": m.get("area"), "image_id": m.get("image_id")} for m in metas]
            metric.update(preds, targets)
        result = metric.compute()
        row.map, row.map50 = round(float(result["map"]), 4), round(float(result["map_50"]), 4)
    return row


def _size_mb(*paths: Path) -> float:
    return round(sum(p.stat().st_size for p in paths) / 2**20, 2)


def _weights_mb(net: nn.Module) -> float:
    """What the PyTorch rows load: the fused network's parameters and buffers (the .ckpt also holds
    optimizer and callback state, which no deployment reads)."""
    tensors = [*net.parameters(), *net.buffers()]
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 2)


# ---------------------------------------------------------------------------- formats
class _Formats:
    """Builds each format's runnable once (the ONNX graph is shared by onnxruntime, OpenVINO,
    INT8 and TensorRT) and returns (forward, files) for a format name."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, work: Path, inputs: _Inputs) -> None:
        import torch

        self.model, self.args, self.work, self.inputs = model, args, work, inputs
        self.device = torch.device(args.device)
        self._onnx: Path | None = None
        self._int8: Path | None = None

    def onnx(self) -> Path:
        from detectkit.serve.backends import prepare_onnx

        if self._onnx is None:
            self._onnx = prepare_onnx(self.model, self.args.checkpoint, self.work)
        return self._onnx

    def int8(self) -> Path:
        from detectkit.export.ort_int8 import quantize_for_onnxruntime

        if self.inputs.calibration is None:
            raise _Skip("needs --data (INT8 is calibrated on validation images)")
        if self._int8 is None:
            self._int8 = quantize_for_onnxruntime(self.onnx(), self.onnx().with_suffix(".int8.onnx"),
                                                  self.inputs.calibration)
        return self._int8

    def build(self, name: str) -> tuple[Callable, list[Path], float | None]:
        """(forward, files on disk, size in MiB when it is not the files')."""
        from detectkit.serve import backends

        args = self.args
        if name in ("torch", "torch-compiled"):
            backend = backends.TorchBackend(self.model, self.device)
            if name == "torch":
                return backend, [], _weights_mb(backend.net)
            import torch

            compiled = torch.compile(backend.net)
            return (lambda x: compiled(x.to(self.device))), [], _weights_mb(backend.net)
        if name in ("onnxruntime", "onnxruntime-int8"):
            _require("onnxruntime")
            path = self.onnx() if name == "onnxruntime" else self.int8()
            return backends.OnnxRuntimeBackend(path, _cpu(), args.threads), [path], None
        if name in ("openvino", "openvino-int8"):
            _require("openvino")
            if name == "openvino":
                xml = backends.prepare_openvino(self.model, self.onnx())
            else:
                from detectkit.export.openvino import save_openvino

                xml = self.int8().with_suffix(".xml")
                if not xml.is_file():
                    save_openvino(self.int8(), xml)
            return backends.OpenVINOBackend(xml, _cpu(), args.threads), [xml, xml.with_suffix(".bin")], None
        if name == "torchscript":
            import torch

            from detectkit.export.deploy import ExportConfig
            from detectkit.export.torchscript import export_torchscript

            path = self.work / f"{Path(args.checkpoint).stem}.torchscript"
            net = _deploy_copy(self.model)
            export_torchscript(net, path, ExportConfig(image_size=tuple(self.model.inference.image_size)))
            module = torch.jit.load(str(path), map_location=self.device).eval()
            return (lambda x: module(x.to(self.device))), [path], None
        if name == "tensorrt":
            _require("tensorrt")
            if self.device.type != "cuda":
                raise _Skip("runs on a CUDA device: pass --device cuda")
            engine = backends.prepare_engine(self.onnx(), tuple(self.model.inference.image_size), args.batch)
            return backends.TensorRTBackend(engine, self.device), [engine], None
        raise ValueError(f"unknown format {name!r}")


class _Skip(Exception):
    """A format that cannot run here; its message is the row's status."""


def _require(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise _Skip(MISSING[package])


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


def _deploy_copy(model: nn.Module) -> nn.Module:
    """The network every exported file holds: reparameterized and Conv+BN fused (as prepare_onnx does)."""
    import copy

    net = copy.deepcopy(model).cpu().float().eval()
    if hasattr(net, "reparameterize"):
        net = net.reparameterize()
    return net.fuse() if hasattr(net, "fuse") else net


def run_benchmark(args: argparse.Namespace) -> tuple[list[BenchRow], dict[str, Any]]:
    """Every selected format's row, and the run's context (what mAP means here, sizes, threads)."""
    import torch

    from detectkit.checkpoint import read_checkpoint
    from detectkit.cli.export import load_for_export

    _check_args(args)
    names = _selected(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_for_export(None, args.checkpoint)
    size = int(model.inference.image_size[0])
    inputs = _inputs(args, size)
    post = model.inference.postprocess
    context: dict[str, Any] = {
        "checkpoint": str(args.checkpoint), "image_size": list(model.inference.image_size), "batch": args.batch,
        "runs": args.runs, "threads": args.threads, "device": str(args.device),
        "latency": "detect_batch (network + NMS + letterbox inverse), wall clock",
    }
    if inputs.val is not None:
        context["map_source"] = f"--data {args.data} ({sum(len(b[1]) for b in inputs.val)} images, COCO mAP@[.5:.95])"
    else:
        found = recorded_map(read_checkpoint(args.checkpoint))
        context["map_source"] = (f"not measured (no --data); the checkpoint records {found[0]}={found[1]:.4f}"
                                 if found else "not measured (no --data) and the checkpoint records no val mAP")
        context["recorded_map"] = found[1] if found else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="detectkit-benchmark-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        formats = _Formats(model, args, work, inputs)
        for name in names:
            row = BenchRow(format=name)
            try:
                forward, files, mb = formats.build(name)
                row.file = str(files[0]) if files and args.work_dir else (files[0].name if files else None)
                row.size_mb = mb if mb is not None else _size_mb(*files)
                _measure(row, forward, inputs, post, args)
            except _Skip as e:
                row.status = str(e)
            except Exception as e:  # one runtime failing must not hide the others' figures
                if os.environ.get("DETECTKIT_DEBUG") or "--debug" in sys.argv:
                    raise
                row.status = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
            log.info("%s: %s", name, row.status)
            rows.append(row)
    return rows, context


def format_table(rows: Sequence[BenchRow], context: dict[str, Any]) -> str:
    """A plain-text table (fits a terminal and a README code block) with the run's context above it."""
    head = ("format", "size MB", "mAP", "mAP50", "p50 ms (b1)", "p90 ms (b1)", f"img/s (b{context['batch']})")

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    body = []
    for r in rows:
        if r.status == "ok":
            body.append((r.format, cell(r.size_mb), cell(r.map), cell(r.map50), cell(r.p50_ms), cell(r.p90_ms),
                         cell(r.throughput)))
        else:
            body.append((r.format, r.status))
    widths = [max(len(head[i]), *(len(b[i]) for b in body if len(b) == len(head))) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        if len(cells) != len(head):
            return f"{cells[0]:<{widths[0]}}  {cells[1]}"
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    size = "x".join(str(s) for s in context["image_size"])
    threads = f"{context['threads']} thread(s)" if context["threads"] else "each runtime's default threads"
    lines = [f"{context['checkpoint']}: {size} px, {threads}, {context['device']}, "
             f"{context['runs']} timed runs; latency = {context['latency']}",
             f"mAP: {context['map_source']}", "", line(head), line(["-" * w for w in widths])]
    return "\n".join(lines + [line(b) for b in body])


def main(argv: Sequence[str] | None = None) -> int:
    from detectkit.errors import OptionParser

    parser = add_arguments(OptionParser(prog="detectkit benchmark", description=__doc__,
                                        formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    rows, context = run_benchmark(args)
    print(format_table(rows, context))
    print(json.dumps({**context, "rows": [asdict(r) for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
