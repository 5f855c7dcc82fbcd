"""Model cases for bench_peers.py: YOLO-World-S v2 and YOLO-NAS-S, detectkit vs the peer's best path.

Same graph, same weights on both sides: the random-init ultralytics ``yolov8s-worldv2`` state dict
of the parity fixture (``../shared/fixtures/yolo_world_s_parity/state_dict.pt``) is loaded into
ultralytics' ``WorldModel`` and into detectkit's ``yolo_world_v2_s``; both get the same 80
L2-normalised "text" embeddings (no CLIP: ultralytics takes them as ``txt_feats``).

* ``world_onnx_<size>[_b8]``: deployment inference at equal runtime: each side's OWN ONNX export in the
  same onnxruntime, same thread count, same input. detectkit: ``export_detector`` of the deploy model
  (vocabulary folded into the weights by ``reparameterize``: neck guides and the class branch become
  plain convs, Conv+BN fused), raw boxes/scores, run in detectkit's ``ort_session``. ultralytics:
  ``YOLO.export(format="onnx")`` with its defaults (onnxslim on, static shape, the text embeddings
  constant in the graph), run in a plain ``InferenceSession`` as its ``AutoBackend`` creates it (thread
  count set to the case's). Outputs are compared before timing (boxes in pixels, scores).
* ``world_compiled_320``: each side's model under ``torch.compile`` (inductor with frozen weights for
  both; ultralytics' fused model, detectkit's deploy model in channels_last).
* ``nas_onnx_<size>``: YOLO-NAS-S, detectkit's ONNX in onnxruntime against detectkit's own eager fused
  PyTorch: super-gradients (the peer) cannot be installed beside this stack (3.7.1 pins onnxruntime
  1.15, onnx 1.15, numpy <= 1.23 and torchmetrics 0.8), so its export cannot run here.
* ``world_train``: batch 8, 320 px, one step = forward + each side's own loss and assigner
  (detectkit ``V8DetectionLoss``, ultralytics ``v8DetectionLoss``) on identical targets + backward +
  AdamW step (identical param groups: no decay on norms and biases), both eager.

Exported files are cached in the temp folder (export time is printed on stderr, never timed).
ultralytics is imported only inside the peer's setup functions.
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


def _onnx_cache() -> Path:
    import tempfile

    path = Path(tempfile.gettempdir()) / "detectkit_peers_onnx_v2"
    path.mkdir(exist_ok=True)
    return path


def _timed_export(label: str, path: Path, export) -> Path:
    if not path.exists():
        t0 = time.perf_counter()
        tmp = path.with_suffix(".tmp.onnx")
        export(tmp)
        tmp.replace(path)
        print(f"  {label} ONNX export ({path.name}): {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


def _world_detectkit_onnx(size: int) -> Path:
    def export(tmp: Path) -> None:
        from detectkit.export.deploy import ExportConfig, export_detector

        export_detector(_detectkit_model().reparameterize().fuse().eval(), tmp, ExportConfig(image_size=size))

    return _timed_export("detectkit", _onnx_cache() / f"world_s_detectkit_{size}.onnx", export)


def _peer_session(path: Path, threads: int):
    """An ``InferenceSession`` as ultralytics' AutoBackend makes one (default options), with the
    case's thread count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _world_onnx_detectkit(size: int, batch: int):
    def setup(threads: int):
        from detectkit.export.onnx import ort_session

        session = ort_session(_world_detectkit_onnx(size), threads)
        feed = {"images": _images(batch, size).numpy()}
        return lambda: session.run(None, feed)

    return setup


def _world_onnx_ultralytics(size: int, batch: int):
    def setup(threads: int):
        path = _world_ultralytics_onnx(size, batch)
        session = _peer_session(path, threads)
        feed = {session.get_inputs()[0].name: _images(batch, size).numpy()}
        return lambda: session.run(None, feed)

    return setup


def compare_same_layout(detectkit_out, peer_out) -> dict:
    """Both sides as ``(boxes xyxy [B,A,4], scores [B,A,K])``: equal within float tolerance (0.05 px,
    1e-4), or AssertionError."""
    import numpy as np

    box_err = float(np.abs(np.asarray(detectkit_out[0]) - np.asarray(peer_out[0])).max())
    score_err = float(np.abs(np.asarray(detectkit_out[1]) - np.asarray(peer_out[1])).max())
    if box_err > 0.05 or score_err > 1e-4:
        raise AssertionError(f"boxes differ by {box_err:.3g} px, scores by {score_err:.3g}")
    return {"max box diff px": box_err, "max score diff": score_err}


def compare_world(detectkit_out, peer_out) -> dict:
    """detectkit ``(boxes xyxy [B,A,4], scores [B,A,K])`` against ultralytics ``[B, 4+K, A]``
    (boxes as centre, size), through :func:`compare_same_layout`."""
    import numpy as np

    ref = np.asarray(peer_out[0]).transpose(0, 2, 1)
    cxcy, wh = ref[..., :2], ref[..., 2:4]
    return compare_same_layout(detectkit_out, [np.concatenate([cxcy - wh / 2, cxcy + wh / 2], -1), ref[..., 4:]])


def _compiled_forward(label: str, model: torch.nn.Module, size: int):
    """``model`` under torch.compile (inductor, weights frozen as constants: folded and pre-packed for
    oneDNN), compiled on the first call (printed, untimed); returns the timed forward."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    run = torch.compile(model, dynamic=False)
    x = _images(1, size)
    t0 = time.perf_counter()
    with torch.no_grad():
        run(x)
    print(f"  {label} compile ({size}): {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def forward():
        with torch.no_grad():
            return run(x)

    return forward


def _world_compiled_detectkit(size: int):
    def setup(threads: int):
        from detectkit.models.speed import set_channels_last

        model = _detectkit_model().reparameterize().fuse().eval()
        set_channels_last(model)
        return _compiled_forward("detectkit", model, size)

    return setup


def _world_compiled_ultralytics(size: int):
    def setup(threads: int):
        return _compiled_forward("ultralytics", _ultralytics_model().eval().fuse(verbose=False), size)

    return setup


def compare_world_torch(detectkit_out, peer_out) -> dict:
    dk = [t.detach().float().numpy() for t in detectkit_out]
    ul = peer_out[0] if isinstance(peer_out, (tuple, list)) else peer_out
    return compare_world(dk, [ul.detach().float().numpy()])


@functools.lru_cache(maxsize=1)
def _nas_model():
    from detectkit import create_model

    torch.manual_seed(0)
    return create_model("yolo_nas_s", num_classes=80).eval().fuse().eval()


def _nas_onnx(size: int):
    def export(tmp: Path) -> None:
        from detectkit.export.deploy import ExportConfig, export_detector

        export_detector(_nas_model(), tmp, ExportConfig(image_size=size))

    def setup(threads: int):
        from detectkit.export.onnx import ort_session

        path = _timed_export("detectkit", _onnx_cache() / f"nas_s_detectkit_{size}.onnx", export)
        session = ort_session(path, threads)
        feed = {"images": _images(1, size).numpy()}
        return lambda: session.run(None, feed)

    return setup


def _nas_eager(size: int):
    def setup(threads: int):
        model, x = _nas_model(), _images(1, size)

        def forward():
            with torch.no_grad():
                return [t.numpy() for t in model(x)]

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


def _world_ultralytics_onnx(size: int, batch: int) -> Path:
    def export(tmp: Path) -> None:
        import os
        import shutil
        import tempfile

        from ultralytics import YOLO
        from ultralytics.cfg import get_cfg

        yolo = YOLO("yolov8s-worldv2.yaml", verbose=False)
        yolo.model = _ultralytics_model().eval()
        yolo.model.names = {i: str(i) for i in range(NUM_PROMPTS)}
        yolo.model.task, yolo.model.yaml_file = "detect", "yolov8s-worldv2.yaml"
        yolo.model.args = {**vars(get_cfg()), "imgsz": size, "task": "detect", "data": None}
        cwd = os.getcwd()
        work = tempfile.mkdtemp(prefix="peers_ul_export_")
        try:  # ultralytics writes next to the (virtual) weights file: keep it out of the checkout
            os.chdir(work)
            out = yolo.export(format="onnx", imgsz=size, batch=batch, verbose=False)
            shutil.move(out, tmp)
        finally:
            os.chdir(cwd)
            shutil.rmtree(work, ignore_errors=True)

    return _timed_export("ultralytics", _onnx_cache() / f"world_s_ultralytics_{size}_b{batch}.onnx", export)


def cases() -> list[Case]:
    out = [
        Case("world_train", "world_train", "images", TRAIN_BATCH, _detectkit_train(), _ultralytics_train,
             warmup=1, min_runs=5,
             detectkit_ran=f"YOLO-World-S train step, batch {TRAIN_BATCH}, {TRAIN_SIZE} px, eager, own loss",
             peer_ran="the same step in its own WorldModel + v8DetectionLoss, eager",
             note="forward + loss/assigner + backward + AdamW; both on the same oneDNN kernels"),
    ]
    for size, batch in ((320, 1), (640, 1), (320, 8)):
        name = f"world_onnx_{size}" + (f"_b{batch}" if batch > 1 else "")
        out.append(Case(
            name, "world_onnx", "images", batch, _world_onnx_detectkit(size, batch),
            _world_onnx_ultralytics(size, batch), warmup=2, min_runs=10 if batch == 1 else 5,
            compare=compare_world,
            detectkit_ran=f"YOLO-World-S ONNX, {size} px, batch {batch}, 80-word vocabulary folded into "
                          "the weights, onnxruntime",
            peer_ran=f"its own ONNX export (onnxslim, text constant in the graph), {size} px, batch {batch}, "
                     "onnxruntime",
            note="raw decoded boxes and scores, no NMS, same input"))
    out.append(Case(
        "world_compiled_320", "world_compiled", "images", 1, _world_compiled_detectkit(320),
        _world_compiled_ultralytics(320), warmup=3, min_runs=10, compare=compare_world_torch,
        detectkit_ran="YOLO-World-S deploy model, 320 px, channels_last, torch.compile (inductor, frozen)",
        peer_ran="its fused model, 320 px, torch.compile (inductor, frozen)",
        note="compile time excluded (stderr)"))
    for size in (320, 640):
        out.append(Case(
            f"nas_onnx_{size}", "nas_onnx", "images", 1, _nas_onnx(size), _nas_eager(size), warmup=2,
            min_runs=10, peer="detectkit eager", compare=compare_same_layout,
            detectkit_ran=f"YOLO-NAS-S ONNX (RepVGG and Conv+BN fused), {size} px, onnxruntime",
            peer_ran=f"the same fused model in eager PyTorch, {size} px (super-gradients cannot be "
                     "installed beside this stack)",
            note="raw boxes and scores, no NMS"))
    return out
