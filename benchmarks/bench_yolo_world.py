"""YOLO-World v2 on this machine: eager inference latency and train-step throughput.

    python benchmarks/bench_yolo_world.py [--variant s] [--sizes 320 640] [--train-size 320] [--batch 4]

Prints one JSON object and a table. Inference: eval mode, batch 1, no NMS, with the text path
(80 prompts) and with the vocabulary baked in (``reparameterize`` + ``fuse``). Train step:
forward + ``detectkit.losses.V8DetectionLoss`` + backward + AdamW step on random images with
random boxes (falls back to forward+backward of the summed outputs if the loss is missing).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from detectkit import create_model


def _time(fn, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def inference(model, size: int, runs: int) -> dict[str, float]:
    x = torch.rand(1, 3, size, size)
    with torch.inference_mode():
        times = _time(lambda: model(x), warmup=2, runs=runs)
    return {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times)}


def random_targets(batch: int, size: int, num_classes: int, per_image: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in range(batch):
        xy = torch.rand(per_image, 2, generator=g) * size * 0.7
        wh = torch.rand(per_image, 2, generator=g) * size * 0.3 + 8
        cls = torch.randint(0, num_classes, (per_image, 1), generator=g).float()
        rows.append(torch.cat([torch.full((per_image, 1), float(b)), cls, xy, (xy + wh).clamp(max=size)], 1))
    return torch.cat(rows)


def train_step(model, size: int, batch: int, steps: int) -> dict[str, object]:
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.rand(batch, 3, size, size)
    try:
        from detectkit.losses import build_loss

        loss_fn = build_loss(model.default_loss, model.num_classes)
        targets = random_targets(batch, size, model.num_classes)
        what = "forward + V8DetectionLoss + backward + AdamW"

        def objective():
            total, _ = loss_fn(model(x), targets, batch_size=batch)
            return total.sum()
    except ImportError:
        what = "forward + backward of summed outputs + AdamW (detectkit.losses missing)"

        def objective():
            out = model(x)
            return out.cls_logits.sum() + out.reg_distri.sum()

    def step():
        opt.zero_grad(set_to_none=True)
        objective().backward()
        opt.step()

    times = _time(step, warmup=1, runs=steps)
    return {
        "what": what,
        "batch": batch,
        "size": size,
        "images_per_s": batch / statistics.median(times),
        "median_step_s": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="s", choices=list("smlx"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = create_model(f"yolo_world_v2_{args.variant}").eval()
    baked = copy.deepcopy(model).reparameterize().fuse().eval()
    report: dict[str, object] = {
        "model": f"yolo_world_v2_{args.variant}",
        "prompts": model.num_classes,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "inference": {},
    }
    for size in args.sizes:
        report["inference"][str(size)] = {
            "text_path": inference(model, size, args.runs),
            "baked_fused": inference(baked, size, args.runs),
        }
    report["train"] = train_step(model, args.train_size, args.batch, args.steps)
    print(json.dumps(report, indent=2))
    print(f"\n{'size':>6} | {'text path ms':>12} | {'baked+fused ms':>14}")
    for size, row in report["inference"].items():
        print(
            f"{size:>6} | {row['text_path']['median_ms']:>12.1f} | {row['baked_fused']['median_ms']:>14.1f}"
        )
    t = report["train"]
    print(f"train {t['size']}px batch {t['batch']}: {t['images_per_s']:.2f} images/s ({t['what']})")


if __name__ == "__main__":
    main()
