"""Train-step throughput of YOLO-NAS-S (forward, PPYOLOE loss, backward, AdamW step), fp32 vs bf16 autocast.

    python benchmarks/bench_train_step.py [--size 320] [--batch 8] [--steps 5] [--device cpu]

Prints a table, then one JSON line. The loss always runs in fp32 (as in DetectionModule).
Set OMP_WAIT_POLICY=PASSIVE when the CPU is shared: spinning OpenMP threads otherwise
dominate the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from detectkit import create_model  # noqa: E402
from detectkit.losses import build_loss  # noqa: E402


def synthetic_targets(batch: int, size: int, per_image: int = 4, num_classes: int = 80) -> torch.Tensor:
    """Fixed random boxes (batch_index, class, x1, y1, x2, y2): the assigner does real work."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in range(batch):
        for _ in range(per_image):
            wh = torch.rand(2, generator=g) * size * 0.4 + size * 0.05
            xy = torch.rand(2, generator=g) * (size - wh)
            cls = float(torch.randint(num_classes, (1,), generator=g))
            rows.append([b, cls, *xy.tolist(), *(xy + wh).tolist()])
    return torch.tensor(rows, dtype=torch.float32)


def measure(precision: str, size: int, batch: int, steps: int, warmup: int, device: str) -> dict:
    torch.manual_seed(0)
    model = create_model("yolo_nas_s", num_classes=80).to(device).train()
    loss_fn = build_loss(model.default_loss, model.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-5)
    x = torch.rand(batch, 3, size, size, device=device)
    targets = synthetic_targets(batch, size).to(device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    times = []
    for i in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
            head = model(x)
        head = head._replace(cls_logits=head.cls_logits.float(), reg_distri=head.reg_distri.float())
        loss, _ = loss_fn(head, targets, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    mean = sum(times) / len(times)
    return {
        "precision": precision, "size": size, "batch": batch, "steps": steps,
        "s_per_step": round(mean, 4), "images_per_s": round(batch / mean, 2), "min_s_per_step": round(min(times), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", default="fp32,bf16")
    args = p.parse_args()
    rows = [measure(pr, args.size, args.batch, args.steps, args.warmup, args.device) for pr in args.precisions.split(",")]
    print(f"yolo_nas_s train step, {args.size}x{args.size}, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'precision':<10}{'s/step':>10}{'images/s':>10}")
    for r in rows:
        print(f"{r['precision']:<10}{r['s_per_step']:>10.3f}{r['images_per_s']:>10.2f}")
    print(json.dumps({"benchmark": "train_step", "model": "yolo_nas_s", "device": args.device,
                      "threads": torch.get_num_threads(), "results": rows}))


if __name__ == "__main__":
    main()
