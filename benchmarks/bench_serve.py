"""``detectkit serve`` under load: batch-1 serving vs dynamic batching at 1, 8 and 32 clients.

    python benchmarks/bench_serve.py --checkpoint runs/quickstart/logs/version_0/checkpoints/last.ckpt \
        [--backend onnxruntime] [--concurrency 1 8 32] [--requests 300] [--seconds 30] \
        [--max-batch 16] [--batch-timeout-ms 10] [--image some.jpg]

Starts the real server twice on a free 127.0.0.1 port (``--max-batch 1``, then ``--max-batch
N``), drives it with an asyncio httpx client (each of C clients sends its next request when
the last one is answered, a closed loop), bounded by ``--requests`` per level and
``--seconds`` per level, and prints a table plus one JSON line: requests/s and p50/p95/p99
latency per mode and concurrency, and the dynamic/batch-1 throughput ratio. Without
``--checkpoint`` a random-weights YOLO-NAS-S at 128 px is written to a temporary folder (the
quickstart's size), so the script runs anywhere; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from detectkit.serve.launch import LocalServer, ServerNotReady


def _random_checkpoint(folder: Path) -> Path:
    import torch

    from detectkit import create_model
    from detectkit.models.base import InferenceDefaults

    torch.manual_seed(0)
    model = create_model("yolo_nas_s", num_classes=3).eval()
    model.inference = InferenceDefaults(image_size=(128, 128), longest=None)
    from detectkit.checkpoint import save_weights

    return save_weights(model, folder / "yolo_nas_s_128_random.ckpt")


def _test_image(path: str | None) -> tuple[bytes, str]:
    if path:
        data = Path(path).read_bytes()
        return data, "image/png" if path.lower().endswith(".png") else "image/jpeg"
    from PIL import Image

    rng = np.random.default_rng(0)
    img = np.full((480, 640, 3), 100, np.uint8)
    for _ in range(8):
        y, x = rng.integers(0, 400), rng.integers(0, 560)
        img[y : y + rng.integers(20, 80), x : x + rng.integers(20, 80)] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "image/jpeg"


def start_server(args: argparse.Namespace, checkpoint: Path, max_batch: int, log_dir: Path) -> LocalServer:
    extra = ["--backend", args.backend, "--device", args.device, "--max-batch", str(max_batch),
             "--batch-timeout-ms", str(args.batch_timeout_ms), "--log-level", "warning",
             "--api-servers", str(args.api_servers)]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    if args.cache_dir:
        extra += ["--cache-dir", args.cache_dir]
    try:
        return LocalServer(checkpoint, *extra, log_path=log_dir / f"server-b{max_batch}.log",
                           start_timeout=args.start_timeout)
    except ServerNotReady as e:
        raise SystemExit(str(e)) from None


async def _load(url: str, body: bytes, ctype: str, clients: int, requests: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def worker() -> None:
            nonlocal sent, errors
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                start = time.perf_counter()
                r = await client.post("/predict", content=body, headers={"content-type": ctype})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1
                    if errors == 1:
                        print(f"first error from {url}: {r.status_code} {r.text[:300]}", file=sys.stderr)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    q = np.percentile(latencies, [50, 95, 99]) * 1000 if latencies else [float("nan")] * 3
    return {"clients": clients, "requests": len(latencies), "errors": errors, "seconds": round(elapsed, 3),
            "rps": round(len(latencies) / elapsed, 2), "p50_ms": round(float(q[0]), 2),
            "p95_ms": round(float(q[1]), 2), "p99_ms": round(float(q[2]), 2)}


def _batch_sizes(url: str) -> float | None:
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("detectkit_batch_size_")}
    count = values.get("detectkit_batch_size_count")
    return round(values["detectkit_batch_size_sum"] / count, 2) if count else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--backend", default="onnxruntime", choices=("torch", "onnxruntime", "tensorrt"))
    p.add_argument("--device", default="auto")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=300, help="at most this many requests per level")
    p.add_argument("--seconds", type=float, default=30.0, help="at most this long per level")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-timeout-ms", type=float, default=10.0)
    p.add_argument("--api-servers", type=int, default=2, help="HTTP processes (decode + letterbox run there)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--image", default=None, help="image file to send (default: a generated 640x480 JPEG)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--start-timeout", type=float, default=300.0)
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="detectkit-bench-serve-"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else _random_checkpoint(work)
    body, ctype = _test_image(args.image)
    results: dict[str, list[dict]] = {}
    for mode, max_batch in (("batch-1", 1), ("dynamic", args.max_batch)):
        server = start_server(args, checkpoint, max_batch, work)
        try:
            asyncio.run(_load(server.url, body, ctype, 1, args.warmup, args.seconds))
            rows = []
            for clients in args.concurrency:
                row = asyncio.run(_load(server.url, body, ctype, clients, args.requests, args.seconds))
                rows.append(row)
            for row in rows:
                row["mode"] = mode
            results[mode] = rows
            results[mode + "_mean_batch"] = _batch_sizes(server.url)
        finally:
            server.stop()

    print(f"{'mode':>8} | {'clients':>7} | {'req/s':>8} | {'p50 ms':>8} | {'p95 ms':>8} | {'p99 ms':>8} | {'errors':>6}")
    for mode in ("batch-1", "dynamic"):
        for r in results[mode]:
            print(f"{mode:>8} | {r['clients']:>7} | {r['rps']:>8.2f} | {r['p50_ms']:>8.2f} | {r['p95_ms']:>8.2f} | "
                  f"{r['p99_ms']:>8.2f} | {r['errors']:>6}")
    speedup = {str(a["clients"]): round(b["rps"] / a["rps"], 2) if a["rps"] else None
               for a, b in zip(results["batch-1"], results["dynamic"])}
    print("dynamic / batch-1 requests/s: " + ", ".join(f"{k} clients {v}x" for k, v in speedup.items()))
    print(f"mean batch size under load: batch-1 {results['batch-1_mean_batch']}, dynamic {results['dynamic_mean_batch']}")
    report = {"bench": "serve", "checkpoint": str(checkpoint), "backend": args.backend, "device": args.device,
              "max_batch": args.max_batch, "batch_timeout_ms": args.batch_timeout_ms, "image_bytes": len(body),
              "results": results["batch-1"] + results["dynamic"], "speedup": speedup,
              "mean_batch": {"batch-1": results["batch-1_mean_batch"], "dynamic": results["dynamic_mean_batch"]},
              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "median_p99_ms": statistics.median(r["p99_ms"] for r in results["dynamic"])}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
