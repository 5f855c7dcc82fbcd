"""The steps of ``benchmarks/gpu_suite.sh``: one GPU's train, TensorRT and serve figures (issue 27).

    python benchmarks/gpu_bench.py train_world|tensorrt|serve|train_nas --out DIR/STEP.json [--dry-run]
    python benchmarks/gpu_bench.py report --results DIR [--steps a,b] [--dry-run] [--wall-s S]
    python benchmarks/gpu_bench.py mark --out DIR/STEP.json --status error|skipped --reason TEXT

Each measuring step runs in its own process (the shell script starts it under ``timeout``) and
writes ONE JSON file: ``{"step", "status", "reason", "device", "rows": [...]}``. A row is one
figure with its own ``status`` (``ok``, ``skipped`` with a ``reason``, or ``error`` with the
exception); a step is ``error`` when any row is, ``ok`` when some row measured, else ``skipped``.
``report`` reads the folder and prints the table and ONE JSON line; ``error`` records a step that
died (or was not started) before writing its file (the shell script calls it).

* ``train_world``, ``train_nas``: YOLO-World-S v2 and YOLO-NAS-S train steps (forward, the module's loss in fp32,
  backward, AdamW) through ``DetectionModule.run_model`` / ``compute_loss`` (``training_step``'s
  path): eager fp32 (the default), bf16 autocast + channels_last, and that under ``torch.compile``;
  ultralytics' own YOLO-World train step (its ``WorldModel.loss``, fp32 and its trainer's fp16 AMP)
  when ultralytics is importable. images/s at the median step; FLOPs per step counted once per model
  with ``torch.utils.flop_counter.FlopCounterMode`` on an eager fp32 step; MFU = achieved FLOP/s over
  the card's dense bf16 peak (:data:`PEAK_BF16`; unknown card: no MFU).
* ``tensorrt``: YOLO-NAS-S, batch 1: the raw (boxes, scores) ONNX graph of
  ``detectkit.export.deploy.export_detector`` built by ``detectkit.export.tensorrt.build_engine`` as
  FP16, and the modelopt PTQ Q/DQ graph (calibrated on noise: latency only) as INT8; timed through
  the server's ``TensorRTBackend``. Printed beside super-gradients' published T4 figures.
* ``serve``: the server's batching backend in process (``TorchBackend`` + ``detect_batch`` at batch
  1 and at the dynamic batch's size), then, on a GPU (or with ``SERVE_HTTP=1``), the real server under
  load through ``benchmarks/bench_serve.py`` (batch-1 vs dynamic batching, 1/8/32 clients).

``--dry-run``: CPU, 64 px, batch 2, 1-2 timed steps, no compile, no HTTP server: every code path up
to what needs a GPU runs, so the suite is checked before a lent GPU's minutes are spent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics: no update checks, no downloads
os.environ.setdefault("YOLO_VERBOSE", "False")

#: in the order the suite runs them: the headline first, the slowest compile last
STEPS = ("train_world", "tensorrt", "serve", "train_nas")

#: dense (no sparsity) bf16 tensor-core peak FLOP/s from NVIDIA's data sheets, matched in this order
#: against ``torch.cuda.get_device_name()``; T4 has no bf16: its fp16 peak. Unknown card: no MFU.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("T4", 65e12),
)

#: super-gradients' published YOLO-NAS-S latency: T4, TensorRT, batch 1, 640x640 (network only)
SG_T4_MS = {"fp16": 3.21, "int8": 2.36}

NUM_CLASSES = 80


def peak_flops(device_name: str | None) -> float | None:
    for key, peak in PEAK_BF16:
        if device_name and key.lower() in device_name.lower():
            return peak
    return None


class Skip(Exception):
    """A row that cannot run here; the message is its reason."""


# ------------------------------------------------------------------------------------ settings
class Settings:
    """Sizes for a real run on a GPU, or tiny ones on the CPU for --dry-run."""

    def __init__(self, dry_run: bool) -> None:
        import torch

        self.dry_run = dry_run
        self.cuda = torch.cuda.is_available() and not dry_run
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.device_name = torch.cuda.get_device_name(0) if self.cuda else (platform.processor() or "cpu")
        env = os.environ
        if dry_run:
            self.size, self.batch, self.warmup, self.runs = 64, 2, 1, 2
            self.trt_runs, self.serve_batch, self.serve_runs = 3, 4, 2
        else:
            self.size = int(env.get("GPU_SUITE_SIZE", 640))
            self.batch = int(env.get("GPU_SUITE_BATCH", 32))
            self.warmup, self.runs = 3, int(env.get("GPU_SUITE_RUNS", 10))
            self.trt_runs, self.serve_batch, self.serve_runs = 200, 16, 20
        self.compile = not dry_run or env.get("GPU_SUITE_COMPILE") == "1"

    def context(self) -> dict:
        import torch

        return {"device": self.device_name, "device_type": self.device.type, "size": self.size,
                "batch": self.batch, "torch": torch.__version__,
                "cuda": torch.version.cuda if self.cuda else None,
                "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32) if self.cuda else None,
                "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32) if self.cuda else None}

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def _row(name: str, fn: Callable[[], dict]) -> dict:
    """Run one figure; a Skip or an exception becomes the row's status (the step goes on)."""
    t0 = time.perf_counter()
    try:
        row = {"name": name, "status": "ok", **fn()}
    except Skip as e:
        row = {"name": name, "status": "skipped", "reason": str(e)}
    except Exception as e:  # one failing figure must not hide the others
        traceback.print_exc()
        row = {"name": name, "status": "error", "reason": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    print(f"  {name}: {row['status']} ({row['wall_s']} s) {row.get('reason', '')}", file=sys.stderr, flush=True)
    return row


def _timed(fn: Callable[[], object], warmup: int, runs: int, sync: Callable[[], None]) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - t0)
    return seconds


# ---------------------------------------------------------------------------------------- train
def _text_embeddings():
    import torch
    import torch.nn.functional as F

    return F.normalize(torch.randn(NUM_CLASSES, 512, generator=torch.Generator().manual_seed(2)), dim=-1)


def _detector(model_name: str):
    import torch

    from detectkit import create_model

    torch.manual_seed(0)  # every variant starts from the same weights
    model = create_model(model_name, num_classes=NUM_CLASSES)
    return model.set_text_embeddings(_text_embeddings()) if model_name.startswith("yolo_world") else model


def _inputs(s: Settings):
    import torch
    from bench_train_step import synthetic_targets

    x = torch.rand(s.batch, 3, s.size, s.size, generator=torch.Generator().manual_seed(1)).to(s.device)
    return x, synthetic_targets(s.batch, s.size, num_classes=NUM_CLASSES).to(s.device)


def detectkit_step(model_name: str, s: Settings, bf16: bool, channels_last: bool, compile: bool):
    import torch

    from detectkit.models.speed import SpeedConfig
    from detectkit.modules import DetectionModule, param_groups

    speed = SpeedConfig(channels_last=channels_last, compile={"dynamic": False} if compile else False)
    module = DetectionModule(_detector(model_name), speed=speed).to(s.device).train()
    opt = torch.optim.AdamW(param_groups(module.model, 0.05), lr=1e-4)
    x, targets = _inputs(s)

    def step():
        with torch.autocast(device_type=s.device.type, dtype=torch.bfloat16, enabled=bf16):
            head = module.run_model(x)
        loss, _ = module.compute_loss(head, targets, s.batch)  # fp32 whatever the autocast, as training_step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def ultralytics_world_step(s: Settings, amp: bool):
    """ultralytics' own YOLO-World-S v2 train step (random init, same 80 embeddings, same targets)."""
    import torch
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import WorldModel

    from detectkit.modules import param_groups

    torch.manual_seed(0)
    model = WorldModel("yolov8s-worldv2.yaml", nc=NUM_CLASSES, verbose=False)
    model.txt_feats = _text_embeddings()[None]
    model.model[-1].nc = NUM_CLASSES
    model.args = get_cfg()  # the loss gains (box 7.5, cls 0.5, dfl 1.5)
    model = model.to(s.device).train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    x, t = _inputs(s)
    xyxy = t[:, 2:6] / s.size
    xywh = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1)
    batch = {"img": x, "batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": xywh,
             "txt_feats": model.txt_feats.to(s.device).expand(s.batch, -1, -1)}

    def step():
        with torch.autocast(device_type=s.device.type, enabled=amp):  # its trainer: fp16 autocast + GradScaler
            loss, _ = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss.sum()).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    return step


def count_flops(step: Callable[[], object]) -> float:
    """FLOPs of one call (matmuls and convolutions, forward and backward) by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def _throughput(step, s: Settings, flops: float | None) -> dict:
    t0 = time.perf_counter()
    step()  # first call: compile, cuDNN autotune, allocations (reported, not timed)
    s.sync()
    first_s = time.perf_counter() - t0
    seconds = _timed(step, s.warmup - 1, s.runs, s.sync)
    med = statistics.median(seconds)
    row = {"images_per_s": round(s.batch / med, 2), "step_ms": round(1000 * med, 2),
           "min_step_ms": round(1000 * min(seconds), 2), "runs": len(seconds), "first_step_s": round(first_s, 2)}
    if flops:
        row["gflop_per_step"] = round(flops / 1e9, 1)
        row["tflop_per_s"] = round(flops / med / 1e12, 2)
        peak = peak_flops(s.device_name) if s.cuda else None
        row["mfu"] = round(flops / med / peak, 4) if peak else None
        if not peak:
            row["mfu_omitted"] = (f"no bf16 peak for {s.device_name!r} in gpu_bench.PEAK_BF16" if s.cuda
                                  else "no GPU (CPU run)")
    return row


TRAIN_MODELS = {"train_world": ("yolo_world_v2_s", "world_s"), "train_nas": ("yolo_nas_s", "nas_s")}


def run_train(s: Settings, model_name: str, label: str) -> list[dict]:
    import torch

    if s.cuda:  # fp32 rows keep PyTorch's defaults (cuDNN may use TF32 for convolutions; context says)
        torch.backends.cudnn.benchmark = True
    flops: dict[str, float] = {}

    def dk_flops():
        flops["detectkit"] = count_flops(detectkit_step(model_name, s, False, False, False))
        return {"gflop_per_step": round(flops["detectkit"] / 1e9, 1)}

    rows = [_row(f"{label}/flops", dk_flops)]
    variants = [("eager_fp32", False, False, False), ("bf16_cl", True, True, False),
                ("bf16_cl_compile", True, True, True)]
    for variant, bf16, cl, comp in variants:
        def measure(bf16=bf16, cl=cl, comp=comp):
            if comp and not s.compile:
                raise Skip("torch.compile is off in the dry run (the first step compiles for minutes on a CPU; "
                           "GPU_SUITE_COMPILE=1 turns it on)")
            step = detectkit_step(model_name, s, bf16, cl, comp)
            return {"side": "detectkit", **_throughput(step, s, flops.get("detectkit"))}

        rows.append(_row(f"{label}/detectkit_{variant}", measure))
        if s.cuda:
            torch.cuda.empty_cache()
    for variant, amp in (("fp32", False), ("amp_fp16", True)):
        def measure_ul(amp=amp):
            if model_name != "yolo_world_v2_s":
                raise Skip("ultralytics has no YOLO-NAS train step (its NAS class only predicts)")
            if importlib.util.find_spec("ultralytics") is None:
                raise Skip("ultralytics is not importable here (make bench-peers installs it in .venv-peers)")
            if amp and not s.cuda:
                raise Skip("ultralytics' AMP (fp16 autocast + GradScaler) needs CUDA")
            if "ultralytics" not in flops:
                flops["ultralytics"] = count_flops(ultralytics_world_step(s, False))
            return {"side": "ultralytics", **_throughput(ultralytics_world_step(s, amp), s, flops["ultralytics"])}

        rows.append(_row(f"{label}/ultralytics_{variant}", measure_ul))
    return rows


# ------------------------------------------------------------------------------------- tensorrt
def run_tensorrt(s: Settings, work: Path) -> list[dict]:
    import torch

    from detectkit.export.deploy import ExportConfig, export_detector
    from detectkit.export.tensorrt import build_engine

    size = s.size
    config = ExportConfig(image_size=size, dynamic_batch=False, nms=None)
    if importlib.util.find_spec("tensorrt") is None:
        no_engine = "the tensorrt package is not importable here"
    elif not torch.cuda.is_available():
        no_engine = "no CUDA device (TensorRT builds and runs engines on a GPU)"
    elif s.dry_run:
        no_engine = "dry run (CPU only)"
    else:
        no_engine = None
    graphs: dict[str, Path] = {}

    def export(precision: str) -> dict:
        t0 = time.perf_counter()
        path = work / f"yolo_nas_s_{size}_{precision}.onnx"
        model = _detector("yolo_nas_s").eval()
        if precision == "fp16":
            result = export_detector(model.fuse(), path, config)
        else:
            if importlib.util.find_spec("modelopt") is None:
                raise Skip("INT8 needs nvidia-modelopt (PTQ to a Q/DQ graph), not importable here")
            from detectkit.compress.quantize import quantize_model

            dev = s.device
            calib = [torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(4)]
            model = quantize_model(model.to(dev), [c.to(dev) for c in calib], len(calib)).eval()
            result = export_detector(model, path, config, check=False, exact=False)  # noise calibration: no check
        graphs[precision] = path
        return {"onnx_s": round(time.perf_counter() - t0, 2), "qdq_nodes": result.op_counts.get("QuantizeLinear", 0)}

    def engine(precision: str) -> dict:
        base = export(precision)
        if no_engine:
            what = f"Q/DQ graph, {base['qdq_nodes']} QuantizeLinear" if precision == "int8" else "raw graph"
            raise Skip(f"{no_engine} (the {precision} ONNX {what} was exported; no engine built)")
        from detectkit.serve.backends import TensorRTBackend

        t0 = time.perf_counter()
        path = graphs[precision]
        built = build_engine(path, path.with_suffix(".engine"), input_shape=(1, 3, size, size), fp16=True,
                             int8=precision == "int8", max_batch=1)
        if built.suffix != ".engine":
            raise RuntimeError(f"engine not built (trtexec script written to {built})")
        build_s = time.perf_counter() - t0
        backend = TensorRTBackend(built, s.device)
        x = torch.rand(1, 3, size, size, device=s.device)
        ms = [1000 * t for t in _timed(lambda: backend(x), 20, s.trt_runs, s.sync)]
        return {**base, "engine_build_s": round(build_s, 1), "p50_ms": round(statistics.median(ms), 3),
                "p90_ms": round(sorted(ms)[int(0.9 * (len(ms) - 1))], 3), "runs": len(ms),
                "published_t4_ms": SG_T4_MS[precision] if size == 640 else None}

    return [_row(f"nas_s/trt_{p}", lambda p=p: engine(p)) for p in ("fp16", "int8")]


# ---------------------------------------------------------------------------------------- serve
def run_serve(s: Settings, work: Path) -> list[dict]:
    import torch

    from detectkit.data.letterbox import LetterboxInfo
    from detectkit.predict.step import detect_batch
    from detectkit.serve.backends import TorchBackend

    model = _detector("yolo_nas_s").eval()
    rows = []

    def in_process() -> dict:
        backend = TorchBackend(model, s.device)
        post = model.inference.postprocess
        out = {"backend": "torch (fp32, Conv+BN fused)"}
        for n in (1, s.serve_batch):
            x = torch.rand(n, 3, s.size, s.size)
            boxes = [LetterboxInfo(scale=1.0, pad_left=0, pad_top=0, orig_size=(s.size, s.size))] * n
            sec = _timed(lambda x=x, boxes=boxes: detect_batch(backend, x, boxes, post), 2, s.serve_runs, s.sync)
            out[f"b{n}_images_per_s"] = round(n / statistics.median(sec), 1)
        out["batching_gain"] = round(out[f"b{s.serve_batch}_images_per_s"] / out["b1_images_per_s"], 2)
        out["max_batch"] = s.serve_batch
        return out

    rows.append(_row("nas_s/backend_batching", in_process))

    def http() -> dict:
        if not (s.cuda or os.environ.get("SERVE_HTTP") == "1"):
            raise Skip("the HTTP server run (two server starts, ~30 s on this CPU) is left out of the dry run; "
                       "SERVE_HTTP=1 includes it")
        import contextlib
        import io

        from bench_serve import main as bench_serve

        from detectkit.checkpoint import save_weights
        from detectkit.models.base import InferenceDefaults

        model.inference = InferenceDefaults(image_size=(s.size, s.size), longest=None)
        ckpt = save_weights(model, work / f"yolo_nas_s_{s.size}_random.ckpt")
        backend = os.environ.get("SERVE_BACKEND", "torch")
        argv = ["--checkpoint", str(ckpt), "--backend", backend, "--device", s.device.type,
                "--max-batch", str(s.serve_batch), "--cache-dir", str(work)]
        if s.dry_run:
            argv += ["--concurrency", "4", "--requests", "8", "--warmup", "2", "--seconds", "10",
                     "--api-servers", "1", "--threads", "1"]
        else:
            argv += ["--concurrency", "1", "8", "32", "--requests", "300", "--seconds", "10", "--api-servers", "4"]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = bench_serve(argv)
        if code:
            raise RuntimeError(f"bench_serve exited {code}")
        report = json.loads(buf.getvalue().strip().splitlines()[-1])
        return {"backend": backend, "speedup": report["speedup"], "mean_batch": report["mean_batch"],
                "results": report["results"]}

    rows.append(_row("nas_s/http_dynamic_batching", http))
    return rows


# --------------------------------------------------------------------------------------- report
def step_status(rows: list[dict]) -> str:
    states = {r["status"] for r in rows}
    return "error" if "error" in states else "ok" if "ok" in states else "skipped"


def _summary(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status'].upper()}: {row.get('reason', '')}"
    if "images_per_s" in row:
        mfu = f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
        tf = f", {row['tflop_per_s']:g} TFLOP/s" if "tflop_per_s" in row else ""
        return (f"{row['images_per_s']:g} img/s, {row['step_ms']:g} ms/step{tf}{mfu} "
                f"(first step {row['first_step_s']:g} s)")
    if "gflop_per_step" in row:
        return f"{row['gflop_per_step']:g} GFLOP per train step (FlopCounterMode, eager fp32)"
    if "p50_ms" in row:
        pub = row.get("published_t4_ms")
        pub = f"; super-gradients published {pub} ms on a T4 (a different card)" if pub else ""
        return f"p50 {row['p50_ms']:g} ms, p90 {row['p90_ms']:g} ms (engine build {row['engine_build_s']:g} s){pub}"
    if "batching_gain" in row:
        b = row["max_batch"]
        return (f"batch 1 {row['b1_images_per_s']:g} img/s, batch {b} {row[f'b{b}_images_per_s']:g} img/s "
                f"({row['batching_gain']:g}x), {row['backend']}")
    if "speedup" in row:
        gain = ", ".join(f"{k} clients {v}x" for k, v in row["speedup"].items())
        dyn = [r for r in row["results"] if r["mode"] == "dynamic"]
        rps = ", ".join(f"{r['clients']}c {r['rps']:g} req/s p99 {r['p99_ms']:g} ms" for r in dyn)
        return f"dynamic/batch-1 req/s: {gain}; dynamic: {rps}; mean batch {row['mean_batch']['dynamic']}"
    return "ok"


def report(results: Path, dry_run: bool, wall_s: float | None, steps: list[str]) -> int:
    data: dict[str, dict] = {}
    for name in steps:
        path = results / f"{name}.json"
        try:
            data[name] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            data[name] = {"step": name, "status": "error", "reason": f"no readable result ({type(e).__name__})",
                          "rows": []}
    ctx = next((d["context"] for d in data.values() if d.get("context")), {})
    print()
    print(f"GPU suite{' (DRY RUN: CPU, tiny sizes, figures mean nothing)' if dry_run else ''}: "
          f"{ctx.get('device', '?')}, torch {ctx.get('torch', '?')}, {ctx.get('size', '?')} px, "
          f"train batch {ctx.get('batch', '?')}")
    width = max([len(r["name"]) for d in data.values() for r in d.get("rows", [])] + [24])
    for name, d in data.items():
        print(f"-- {name}: {d['status']}" + (f" ({d['reason']})" if d.get("reason") else ""))
        for r in d.get("rows", []):
            print(f"   {r['name']:<{width}}  {_summary(r)}")
    omitted = sorted({r["mfu_omitted"] for d in data.values() for r in d.get("rows", []) if r.get("mfu_omitted")})
    if omitted:
        print(f"MFU omitted: {'; '.join(omitted)}")
    print("MFU = model FLOPs per step (FlopCounterMode) x steps/s / the card's dense bf16 peak (every row, "
          "fp32 ones included)")
    line = {"benchmark": "gpu_suite", "dry_run": dry_run, "wall_s": wall_s, **ctx, "steps": data}
    print(json.dumps(line))
    return 1 if any(d["status"] == "error" for d in data.values()) else 0


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=(*STEPS, "report", "mark"))
    p.add_argument("--out", help="the step's JSON file")
    p.add_argument("--results", help="report: the folder of step files")
    p.add_argument("--steps", default=",".join(STEPS), help="report: which steps, in order")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--wall-s", type=float, default=None)
    p.add_argument("--status", choices=("error", "skipped"), default="error", help="mark: the step's status")
    p.add_argument("--reason", default="", help="mark: why the step has no result")
    args = p.parse_args(argv)
    if args.step == "report":
        steps = [x for x in args.steps.split(",") if x]
        return report(Path(args.results), args.dry_run, args.wall_s, steps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.step == "mark":  # the step is named by its file: DIR/<step>.json
        out.write_text(json.dumps({"step": out.stem, "status": args.status, "reason": args.reason, "rows": []}))
        return 0
    s = Settings(args.dry_run)
    work = out.parent / f"{args.step}_work"
    work.mkdir(exist_ok=True)
    if args.step in TRAIN_MODELS:
        rows = run_train(s, *TRAIN_MODELS[args.step])
    elif args.step == "tensorrt":
        rows = run_tensorrt(s, work)
    else:
        rows = run_serve(s, work)
    status = step_status(rows)
    reason = "; ".join(f"{r['name']}: {r['reason']}" for r in rows if r["status"] == "error") if status == "error" \
        else "; ".join(dict.fromkeys(r["reason"].split(" (")[0] for r in rows)) if status == "skipped" else ""
    out.write_text(json.dumps({"step": args.step, "status": status, "reason": reason, "context": s.context(),
                               "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
