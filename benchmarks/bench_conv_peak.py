"""How close YOLO-World-S's deployed ONNX graph runs to this CPU's FP32 peak in onnxruntime.

Why it exists: at equal precision the only way for one graph to beat another is to do fewer
multiplies or to waste less time between them. This script measures both for detectkit's deploy
graph (the vocabulary folded into the weights, Conv+BN fused, raw boxes/scores) at one thread:

1. onnxruntime's per-node profile, summed by operator type (share of the run time);
2. the graph's convolution FLOPs (2 x MACs, counted with forward hooks on the PyTorch model that was
   exported) over the Conv time of the profile: the convolutions' achieved GFLOP/s;
3. the same core's FP32 matrix-multiply rate, 2048^2 x 2048^2, in onnxruntime (MLAS) and in torch:
   what a dense kernel reaches here.

    taskset -c 1 python benchmarks/bench_conv_peak.py [--size 640] [--runs 6]

Prints a table and one JSON line. Random-init weights (the timing does not depend on their values).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_yolo_world import _time  # noqa: E402  (the one timing loop of these scripts)


def conv_flops(model: torch.nn.Module, size: int) -> float:
    """2 x multiply-adds of every Conv2d in one forward of a 1 x 3 x size x size image."""
    total = [0.0]

    def hook(m: torch.nn.Conv2d, _inp, out: torch.Tensor) -> None:
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        total[0] += 2.0 * k * out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.rand(1, 3, size, size))
    for h in handles:
        h.remove()
    return total[0]


def ort_profile(path: Path, size: int, runs: int) -> tuple[dict[str, float], float]:
    """Milliseconds per run by operator type, and the total, from onnxruntime's profiler (1 thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    session.run(None, {"images": x})  # warm-up, also profiled: dropped below by taking the last runs
    for _ in range(runs):
        session.run(None, {"images": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_run: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    run_index = -1
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            run_index += 1
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_run[run_index + 1][e["args"]["op_name"]] += e["dur"] / 1e3
    timed = [per_run[i] for i in sorted(per_run)[-runs:]]
    ops = {op: float(np.median([r[op] for r in timed])) for op in set().union(*timed)}
    return ops, float(np.median([sum(r.values()) for r in timed]))


def gemm_gflops(n: int = 2048, runs: int = 5) -> dict[str, float]:
    """FP32 n x n x n matrix multiply rate, 1 thread: onnxruntime's MatMul (MLAS) and torch."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    flops = 2.0 * n**3
    out = {}
    for name, fn in (("onnxruntime", lambda: session.run(None, {"a": a, "b": b})),
                     ("torch", lambda ta=torch.from_numpy(a), tb=torch.from_numpy(b): ta @ tb)):
        out[name] = flops / min(_time(fn, warmup=1, runs=runs)) / 1e9
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--runs", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(1)
    from detectkit import create_model
    from detectkit.export.deploy import ExportConfig, export_detector

    torch.manual_seed(0)
    model = create_model("yolo_world_v2_s", num_classes=80)
    text = torch.nn.functional.normalize(torch.randn(80, 512, generator=torch.Generator().manual_seed(2)), dim=-1)
    model = model.set_text_embeddings(text).reparameterize().fuse().eval()
    folder = Path(tempfile.mkdtemp(prefix="conv_peak_"))
    path = folder / f"world_s_{args.size}.onnx"
    export_detector(model, path, ExportConfig(image_size=args.size))
    flops = conv_flops(model, args.size)
    ops, total_ms = ort_profile(path, args.size, args.runs)
    gemm = gemm_gflops()
    conv_ms = ops.get("Conv", 0.0)
    conv_rate = flops / (conv_ms / 1e3) / 1e9 if conv_ms else float("nan")
    print(f"YOLO-World-S deploy graph, {args.size} px, batch 1, 1 thread, onnxruntime; median of {args.runs} runs")
    print(f"{'operator':<20}{'ms':>10}{'share':>8}")
    for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:8]:
        print(f"{op:<20}{ms:>10.2f}{100 * ms / total_ms:>7.1f}%")
    print(f"{'all nodes':<20}{total_ms:>10.2f}")
    print(f"convolution FLOPs {flops / 1e9:.2f} G -> {conv_rate:.1f} GFLOP/s in Conv nodes; "
          f"FP32 GEMM 2048^3 here: onnxruntime {gemm['onnxruntime']:.1f}, torch {gemm['torch']:.1f} GFLOP/s")
    print(json.dumps({
        "benchmark": "conv_peak", "size": args.size, "runs": args.runs, "ops_ms": ops, "total_ms": total_ms,
        "conv_share": conv_ms / total_ms, "conv_gflop": flops / 1e9, "conv_gflops_per_s": conv_rate,
        "gemm_gflops_per_s": gemm, "torch": torch.__version__, "loadavg": os.getloadavg(),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
