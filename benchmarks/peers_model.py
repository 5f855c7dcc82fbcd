"""Model cases for bench_peers.py: YOLO-World-S v2 train step and inference, detectkit vs ultralytics.

Same graph, same weights on both sides: the random-init ultralytics ``yolov8s-worldv2`` state dict
of the parity fixture (``../shared/fixtures/yolo_world_s_parity/state_dict.pt``) is loaded into
ultralytics' ``WorldModel`` and into detectkit's ``yolo_world_v2_s``; both get the same 80
L2-normalised "text" embeddings (no CLIP: ultralytics takes them as ``txt_feats``).

* ``world_train*``: batch 8, 320 px, one step = forward + each side's own loss and assigner
  (detectkit ``V8DetectionLoss``, ultralytics ``v8DetectionLoss``) on identical targets +
  backward + AdamW step (identical param groups: no decay on norms and biases).
  detectkit runs through ``DetectionModule.run_model`` / ``compute_loss`` with the speed options
  named in the case (eager contiguous = the default; ``channels_last``; ``compile``).
* ``world_infer_<size>*``: batch 1, 80 prompts, eval forward with box decoding, no NMS. Both sides
  Conv+BN fused. detectkit additionally bakes the (unchanging) prompts into 1x1 convs
  (``reparameterize``), the inference path it deploys; ultralytics runs its text path with the
  given ``txt_feats``. ``_compiled``: detectkit under ``torch.compile`` (inductor, frozen weights);
  ``_cl``: detectkit weights in channels_last (``detectkit.models.speed.set_channels_last``);
  compile time is printed on stderr at setup and excluded from the timing.
  ``_ort``: detectkit's deployment path: the same fused, prompt-baked model exported by
  ``detectkit.export.deploy.export_detector`` (raw boxes/scores graph, checked against PyTorch)
  and run by the server's ``OnnxRuntimeBackend`` with the case's thread count; ultralytics eager
  (its default ``predict`` path). Export time is printed on stderr, not timed.

ultralytics is imported only inside the ``setup_ultralytics`` functions.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_yolo_world import random_targets  # noqa: E402
from peers_common import Case  # noqa: E402

NUM_PROMPTS = 80
TRAIN_BATCH, TRAIN_SIZE = 8, 320


def _fixture_dir() -> Path:
    for root in (HERE.parent.parent / "shared", Path("/work/shared")):
        path = root / "fixtures" / "yolo_world_s_parity"
        if path.is_dir():
            return path
    raise SystemExit("the YOLO-World-S parity fixture (../shared/fixtures/yolo_world_s_parity) is missing")


@functools.lru_cache(maxsize=1)
def _state() -> dict[str, torch.Tensor]:
    return torch.load(_fixture_dir() / "state_dict.pt", weights_only=True)


def _text() -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return F.normalize(torch.randn(NUM_PROMPTS, 512, generator=gen), dim=-1)


def _targets(batch: int, size: int) -> torch.Tensor:
    """``[N, 6]`` (batch_index, class, x1, y1, x2, y2) in pixels, fixed seed (bench_yolo_world's)."""
    return random_targets(batch, size, NUM_PROMPTS)


def _images(batch: int, size: int) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------- detectkit
def _detectkit_model():
    from detectkit import create_model
    from detectkit.models.yolo_world.weights import load_ultralytics_state_dict

    model = create_model("yolo_world_v2_s", num_classes=NUM_PROMPTS)
    load_ultralytics_state_dict(model, _state())
    return model.set_text_embeddings(_text())


def _detectkit_train(channels_last: bool = False, compile: bool = False):
    def setup(threads: int):
        from detectkit.models.speed import SpeedConfig
        from detectkit.modules import DetectionModule, param_groups

        speed = SpeedConfig(channels_last=channels_last, compile={"dynamic": False} if compile else False)
        module = DetectionModule(_detectkit_model(), speed=speed).train()
        opt = torch.optim.AdamW(param_groups(module.model, 0.05), lr=1e-4)
        x, targets = _images(TRAIN_BATCH, TRAIN_SIZE), _targets(TRAIN_BATCH, TRAIN_SIZE)

        def step():
            loss, _ = module.compute_loss(module.run_model(x), targets, TRAIN_BATCH)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        if compile:
            t0 = time.perf_counter()
            step()
            print(f"  detectkit compile (train, first step): {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return step

    return setup


def _detectkit_infer(size: int, compile: bool = False, channels_last: bool = False):
    def setup(threads: int):
        from detectkit.models.speed import set_channels_last

        model = _detectkit_model().reparameterize().fuse().eval()
        if channels_last:
            set_channels_last(model)
        x = _images(1, size)
        run = model
        if compile:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # weights become constants: folded, pre-packed for oneDNN
            run = torch.compile(model, dynamic=False)
            t0 = time.perf_counter()
            with torch.no_grad():
                run(x)
            print(f"  detectkit compile (inference {size}): {time.perf_counter() - t0:.1f} s", file=sys.stderr)

        def forward():
            with torch.no_grad():
                return run(x)

        return forward

    return setup


def _detectkit_infer_ort(size: int):
    def setup(threads: int):
        import tempfile

        from detectkit.export.deploy import ExportConfig, export_detector
        from detectkit.serve.backends import OnnxRuntimeBackend

        model = _detectkit_model().reparameterize().fuse().eval()
        path = Path(tempfile.mkdtemp(prefix="peers_ort_")) / f"world_s_{size}.onnx"
        t0 = time.perf_counter()
        export_detector(model, path, ExportConfig(image_size=size))
        print(f"  detectkit ONNX export + check ({size}): {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        backend = OnnxRuntimeBackend(path, torch.device("cpu"), threads=threads)
        x = _images(1, size)

        def forward():
            return backend(x)

        return forward

    return setup


# -------------------------------------------------------------------------------- ultralytics
def _ultralytics_model():
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import WorldModel

    model = WorldModel("yolov8s-worldv2.yaml", nc=NUM_PROMPTS, verbose=False)
    model.load_state_dict(_state(), strict=True)
    model.txt_feats = _text()[None]
    model.model[-1].nc = NUM_PROMPTS
    model.args = get_cfg()  # the loss gains (box 7.5, cls 0.5, dfl 1.5)
    return model


def _ultralytics_train(threads: int):
    from detectkit.modules import param_groups

    model = _ultralytics_model().train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    x, t = _images(TRAIN_BATCH, TRAIN_SIZE), _targets(TRAIN_BATCH, TRAIN_SIZE)
    xyxy = t[:, 2:6] / TRAIN_SIZE
    xywh = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1)
    batch = {"img": x, "batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": xywh,
             "txt_feats": model.txt_feats.expand(TRAIN_BATCH, -1, -1)}

    def step():
        loss, _ = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        return loss

    return step


def _ultralytics_infer(size: int):
    def setup(threads: int):
        model = _ultralytics_model().eval()
        model = model.fuse(verbose=False)
        x = _images(1, size)

        def forward():
            with torch.no_grad():
                return model(x)

        return forward

    return setup


def cases() -> list[Case]:
    train_note = (f"YOLO-World-S v2 train step, batch {TRAIN_BATCH}, {TRAIN_SIZE} px: forward + own loss/assigner "
                  "+ backward + AdamW")
    out = [
        Case("world_train", "world_train", "images", TRAIN_BATCH, _detectkit_train(), _ultralytics_train,
             warmup=1, note=train_note + "; detectkit eager, contiguous (default)"),
        Case("world_train_cl", "world_train", "images", TRAIN_BATCH, _detectkit_train(channels_last=True),
             _ultralytics_train, warmup=1, note=train_note + "; detectkit eager, channels_last"),
        Case("world_train_compiled", "world_train_compiled", "images", TRAIN_BATCH, _detectkit_train(compile=True),
             _ultralytics_train, warmup=1, note=train_note + "; detectkit torch.compile (inductor)"),
    ]
    for size in (320, 640):
        note = (f"YOLO-World-S v2 inference, batch 1, {size} px, {NUM_PROMPTS} prompts, decode, no NMS; both "
                "Conv+BN fused; detectkit prompts baked")
        out.append(Case(f"world_infer_{size}", "world_infer", "images", 1, _detectkit_infer(size),
                        _ultralytics_infer(size), warmup=3, min_runs=10, note=note + ", eager"))
        out.append(Case(f"world_infer_{size}_compiled", "world_infer_compiled", "images", 1,
                        _detectkit_infer(size, compile=True), _ultralytics_infer(size), warmup=3, min_runs=10,
                        note=note + "; detectkit torch.compile (inductor, frozen), ultralytics eager"))
        out.append(Case(f"world_infer_{size}_cl", "world_infer_cl", "images", 1,
                        _detectkit_infer(size, channels_last=True), _ultralytics_infer(size), warmup=3,
                        min_runs=10, note=note + "; detectkit eager channels_last, ultralytics eager"))
        out.append(Case(f"world_infer_{size}_cl_compiled", "world_infer_cl_compiled", "images", 1,
                        _detectkit_infer(size, compile=True, channels_last=True), _ultralytics_infer(size),
                        warmup=3, min_runs=10,
                        note=note + "; detectkit channels_last + torch.compile (inductor, frozen), ultralytics eager"))
        out.append(Case(f"world_infer_{size}_ort", "world_infer_ort", "images", 1, _detectkit_infer_ort(size),
                        _ultralytics_infer(size), warmup=3, min_runs=10,
                        note=note + "; detectkit ONNX in onnxruntime (its deploy/serve path), ultralytics eager"))
    return out
