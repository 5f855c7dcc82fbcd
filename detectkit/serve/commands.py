"""``detectkit serve``: a detectkit checkpoint behind HTTP, on LitServe with dynamic batching.

    detectkit serve --checkpoint best.ckpt [--backend torch|onnxruntime|openvino|tensorrt] [--max-batch 16]
        [--batch-timeout-ms 10] [--workers 1] [--host 127.0.0.1] [--port 8000] [--max-body-mb 20]

Endpoints: ``POST /predict`` (image bytes, multipart ``image`` file, or JSON with a base64
``image``; optional conf, iou, max_det, annotate, and classes for YOLO-World), ``GET /live``,
``GET /ready`` (every worker set up, not draining), ``GET /health`` (LitServe's), ``GET
/metrics`` (Prometheus text), ``GET /info``.

Graceful shutdown (SIGTERM or Ctrl-C): LitServe 0.2.19 stops its inference workers before the
HTTP servers, so requests still queued would be lost. Here the first signal makes the gate
refuse new predictions (503 + Retry-After, ``/ready`` 503), waits until every accepted request
has been answered (up to ``--drain-timeout``), and only then asks LitServe to shut down. A
second signal stops at once.

Faults: a client must send its body within ``--body-timeout`` (408), so it cannot hold the drain;
a dead inference worker is restarted by :mod:`detectkit.serve.supervisor` (in-flight requests
503, ``/ready`` 503 until it is back), at most ``--max-restarts`` per ``--restart-window``, after
which the server exits with code 3.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from detectkit.serve.supervisor import EXIT_RESTARTS_EXHAUSTED

log = logging.getLogger("detectkit.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detectkit serve", description="Serve a detectkit checkpoint over HTTP "
                                "with dynamic batching (LitServe).")
    p.add_argument("--checkpoint", required=True, help="detectkit .ckpt (or any file detectkit.load reads)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "openvino", "tensorrt"), default="torch",
                   help="what runs the network (default torch; onnxruntime/openvino export the graph once and "
                        "cache it; openvino runs on the CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (cuda when available)")
    p.add_argument("--max-batch", type=int, default=16, help="largest dynamic batch (1 = no batching)")
    p.add_argument("--batch-timeout-ms", type=float, default=10.0,
                   help="how long a batch waits to fill before it runs (ms)")
    p.add_argument("--workers", type=int, default=1, help="inference worker processes per device")
    p.add_argument("--api-servers", type=int, default=None,
                   help="HTTP server processes; image decoding and letterboxing run there, in parallel with "
                        "inference (default: one per worker)")
    p.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0", "::"))
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body accepted (413 above)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="largest decoded image, width*height (decompression-bomb guard; default: the "
                        "max_pixels limit, 8192*8192, see DETECTKIT_LIMITS)")
    p.add_argument("--text-encoder", default=None,
                   help="YOLO-World: CLIP folder / HF id in the local cache / embeddings .pt file / "
                        "open_clip:NAME, for per-request 'classes'")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait in the queue (504)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds shutdown waits for in-flight requests")
    p.add_argument("--body-timeout", type=float, default=10.0,
                   help="seconds a client has to send its whole request body (408 after; a stalled client "
                        "cannot hold the shutdown drain)")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="inference-worker restarts allowed per --restart-window; one more death stops the server "
                        f"with exit code {EXIT_RESTARTS_EXHAUSTED} (for an orchestrator to restart it)")
    p.add_argument("--restart-window", type=float, default=300.0, help="seconds of the --max-restarts budget")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per worker (torch/onnxruntime)")
    p.add_argument("--cache-dir", default=None,
                   help="where exported ONNX/TensorRT files are kept (default ~/.cache/detectkit/serve)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def _resolve_device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"detectkit serve: --device {spec} but no CUDA device is available")
    return spec


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        print(f"detectkit serve: --checkpoint {checkpoint}: file not found", file=sys.stderr)
        return 2
    for name in ("max_batch", "workers"):
        if getattr(args, name) < 1:
            print(f"detectkit serve: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.batch_timeout_ms < 0 or args.max_body_mb <= 0 or args.body_timeout <= 0:
        print("detectkit serve: --batch-timeout-ms must be >= 0, --max-body-mb and --body-timeout > 0",
              file=sys.stderr)
        return 2
    if args.max_restarts < 0 or args.restart_window <= 0:
        print("detectkit serve: --max-restarts must be >= 0 and --restart-window > 0", file=sys.stderr)
        return 2
    # prometheus_client reads this when it is first imported, in every process LitServe starts
    metrics_dir = tempfile.mkdtemp(prefix="detectkit-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    import litserve as ls

    from detectkit import limits
    from detectkit.predict.pipeline import resolve_settings
    from detectkit.serve.api import DetectionAPI, load_detector
    from detectkit.serve.backends import (
        BackendUnavailable,
        check_openvino,
        check_tensorrt,
        prepare_engine,
        prepare_onnx,
        prepare_openvino,
    )
    from detectkit.serve.gate import RequestGate, SharedState
    from detectkit.serve.metrics import HttpMetrics, PrometheusLogger, configure_json_logging
    from detectkit.serve.supervisor import RestartBudget, WorkerSupervisor

    configure_json_logging(args.log_level)
    model_file = None
    try:
        device = "cpu" if args.backend == "openvino" and args.device == "auto" else _resolve_device(args.device)
        if args.backend == "tensorrt":
            check_tensorrt(device)
        if args.backend == "openvino":
            check_openvino(device)
        model = load_detector(checkpoint, device="cpu")  # the record: vocabulary, input size, settings
        if args.text_encoder and not hasattr(model, "txt_feats"):
            raise ValueError("--text-encoder is for YOLO-World checkpoints; this one is "
                             f"{type(model).__name__}")
        if args.backend != "torch":
            cache = Path(args.cache_dir or Path.home() / ".cache" / "detectkit" / "serve")
            cache.mkdir(parents=True, exist_ok=True)
            model_file = prepare_onnx(model, checkpoint, cache)
            if args.backend == "openvino":
                model_file = prepare_openvino(model, model_file)
            if args.backend == "tensorrt":
                model_file = prepare_engine(model_file, tuple(model.inference.image_size), args.max_batch)
        st = resolve_settings(model)  # the letterbox model.predict would use; the gate applies it
        letterbox = {"size": st.size, "longest": st.longest, "center": st.center, "pad_value": st.pad_value}
        info = {"checkpoint": str(checkpoint), "model": type(model).__name__, "classes": list(model.class_names),
                "image_size": list(model.inference.image_size), "backend": args.backend}
        del model
    except (BackendUnavailable, ValueError, OSError) as e:
        print(f"detectkit serve: {e}", file=sys.stderr)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        return 2

    api = DetectionAPI(
        checkpoint, backend=args.backend, max_batch=args.max_batch, batch_timeout_ms=args.batch_timeout_ms,
        model_file=model_file, text_encoder=args.text_encoder, threads=args.threads, log_level=args.log_level, drained_marker=Path(metrics_dir) / "drained",
    )
    accelerator = "cuda" if device.startswith("cuda") else "cpu"
    devices = [int(device.split(":")[1])] if ":" in device else 1
    state = SharedState(workers_total=args.workers)  # one device: LitServe starts --workers processes
    metrics = HttpMetrics()
    gate = (RequestGate, {"api_path": api.api_path, "max_body_bytes": int(args.max_body_mb * 1024 * 1024),
                          "state": state, "letterbox": letterbox,
                          "max_pixels": args.max_pixels or limits.current().max_pixels, "metrics": metrics,
                          "body_timeout": args.body_timeout})
    # restart_workers: LitServe's worker loop exits (to be restarted) on a fatal error instead of
    # lingering broken; its own monitor is replaced by ours (supervisor.py says why)
    server = ls.LitServer(api, accelerator=accelerator, devices=devices, workers_per_device=args.workers,
                          timeout=args.timeout, middlewares=[gate], loggers=[PrometheusLogger()],
                          model_metadata=info, restart_workers=True)
    server._monitor_workers = False
    supervisor = WorkerSupervisor(server, state, RestartBudget(args.max_restarts, args.restart_window),
                                  metrics=metrics)
    supervisor.start()
    _install_drain(server, state, args.drain_timeout, Path(metrics_dir) / "drained")
    log.info("starting", extra={"fields": {"event": "server_start", "host": args.host, "port": args.port,
                                           **info, "max_batch": args.max_batch,
                                           "batch_timeout_ms": args.batch_timeout_ms, "workers": args.workers}})
    try:
        server.run(host=args.host, port=args.port, num_api_servers=args.api_servers, log_level="warning",
                   access_log=False, generate_client_file=False)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)  # per-run metric files (and the drained marker)
    if supervisor.exhausted.is_set():
        log.error("stopped: inference workers kept dying", extra={"fields": {
            "event": "server_stop", "exit_code": EXIT_RESTARTS_EXHAUSTED}})
        return EXIT_RESTARTS_EXHAUSTED
    log.info("stopped", extra={"fields": {"event": "server_stop"}})
    return 0


def _install_drain(server, state, timeout: float, drained_marker: Path) -> None:
    """First SIGTERM/SIGINT: stop accepting, answer what was accepted, then stop LitServe."""
    started = threading.Event()

    def drain() -> None:
        deadline = time.monotonic() + timeout
        state.draining.set()
        log.info("draining", extra={"fields": {"event": "drain_start", "in_flight": state.in_flight_count()}})
        while state.in_flight_count() > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        left = state.in_flight_count()
        log.info("drained", extra={"fields": {"event": "drain_end", "in_flight_left": left}})
        drained_marker.touch()  # inference workers obey SIGTERM from now on
        # LitServe's own graceful path (what its /shutdown endpoint sets); 0.2.19 has no public call for it
        while getattr(server, "_shutdown_event", None) is None:  # a signal during start-up
            time.sleep(0.05)
        server._shutdown_event.set()

    main_pid = os.getpid()

    def handler(signum, frame) -> None:
        if os.getpid() != main_pid:  # a process LitServe forked inherited this handler
            if multiprocessing.current_process().name.startswith("SyncManager"):
                return  # LitServe's manager holds the request queues: LitServe stops it after the drain
            signal.signal(signum, signal.SIG_DFL)  # e.g. uvicorn re-raising after its own graceful stop
            os.kill(os.getpid(), signum)
            return
        if started.is_set():
            log.warning("second signal: stopping now", extra={"fields": {"event": "shutdown_forced"}})
            raise KeyboardInterrupt
        started.set()
        threading.Thread(target=drain, name="detectkit-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


if __name__ == "__main__":
    sys.exit(main())
