"""A minimal client for ``detectkit serve``: send one image, print the detections, save the drawing.

    detectkit serve --checkpoint runs/quickstart/logs/version_0/checkpoints/last.ckpt --backend onnxruntime
    python experiments/serve/client.py photo.jpg [--url http://127.0.0.1:8000] [--conf 0.3] \
        [--classes "person,dog"] [--save annotated.jpg]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import httpx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Send an image to detectkit serve")
    p.add_argument("image")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--conf", type=float, default=None)
    p.add_argument("--classes", default=None, help="YOLO-World: comma-separated class names for this request")
    p.add_argument("--save", default=None, help="write the annotated image here")
    args = p.parse_args(argv)
    body: dict = {"image": base64.b64encode(Path(args.image).read_bytes()).decode()}
    if args.conf is not None:
        body["conf"] = args.conf
    if args.classes:
        body["classes"] = [c.strip() for c in args.classes.split(",")]
    if args.save:
        body["annotate"] = True
    r = httpx.post(args.url.rstrip("/") + "/predict", json=body, timeout=60)
    if r.status_code != 200:
        print(f"{r.status_code}: {r.json().get('error', r.text)}", file=sys.stderr)
        return 1
    result = r.json()
    if args.save:
        Path(args.save).write_bytes(base64.b64decode(result.pop("annotated_image")))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
