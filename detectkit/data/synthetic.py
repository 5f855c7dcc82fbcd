"""The embedded default dataset: generated COCO-format detection data.

Classes differ by shape AND colour (red rectangles, green ellipses, blue triangles, ...), on
muted textured backgrounds, several objects per image, some small, some overlapping. That is
learnable from scratch on CPU in minutes, yet exercises the whole pipeline. Every image comes
from its own seed ``(seed, split, index)``, so the output is identical however it is produced.
The difficulty knobs live in :class:`SyntheticConfig`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from detectkit.data.formats.coco import write_coco
from detectkit.data.records import ImageRecord

__all__ = [
    "SyntheticConfig",
    "SHAPES",
    "generate_synthetic",
    "synthetic_dataset",
    "synthetic_class_names",
    "default_cache_dir",
    "moving_shapes",
]

log = logging.getLogger("detectkit.data")

GENERATOR_VERSION = 1  # bump when the drawing changes so caches regenerate

# (name, RGB colour); class k draws SHAPES[k]
SHAPES: list[tuple[str, tuple[int, int, int]]] = [
    ("rectangle", (220, 45, 40)),
    ("ellipse", (40, 185, 70)),
    ("triangle", (45, 85, 225)),
    ("diamond", (235, 200, 30)),
    ("cross", (200, 50, 200)),
    ("hexagon", (30, 200, 210)),
    ("star", (245, 130, 20)),
    ("ring", (250, 250, 250)),
]


@dataclass
class SyntheticConfig:
    """What to generate. ``object_size`` and ``small_size`` are fractions of the image side;
    ``texture`` (0..1) is the background clutter strength; ``max_overlap`` the largest overlap
    allowed between two objects of one image, as intersection over the smaller box (0 = no
    contact, 1 = full occlusion allowed)."""

    train_images: int = 512
    val_images: int = 64
    size: int = 256
    num_classes: int = 3
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 4
    object_size: tuple[float, float] = (0.15, 0.5)
    small_fraction: float = 0.2
    small_size: tuple[float, float] = (0.06, 0.15)
    texture: float = 0.5
    max_overlap: float = 0.35
    colour_jitter: int = 25
    jpeg_quality: int = 92
    extra: dict = field(default_factory=dict)  # free-form, only hashed (lets callers force a new cache)

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be 1..{len(SHAPES)}, got {self.num_classes}")
        if self.size < 32:
            raise ValueError(f"size must be at least 32, got {self.size}")
        if not 0 < self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 0 < min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        self.object_size = tuple(float(v) for v in self.object_size)
        self.small_size = tuple(float(v) for v in self.small_size)

    def digest(self) -> str:
        payload = json.dumps({"v": GENERATOR_VERSION, **asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def synthetic_class_names(num_classes: int = 3) -> list[str]:
    return [SHAPES[k][0] for k in range(num_classes)]


def _background(rng: np.random.Generator, size: int, texture: float) -> np.ndarray:
    """Muted low-frequency colour field + grain + faint strokes: clutter without class colours."""
    base = rng.uniform(70, 180)
    low = cv2.resize(
        rng.normal(0, 1, (6, 6, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    low = low.mean(axis=2, keepdims=True) * 0.7 + low * 0.3  # mostly grey-ish tones
    img = base + low * 40 * texture + rng.normal(0, 12 * texture, (size, size, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 1 + round(8 * texture)))):
        grey = int(rng.uniform(40, 220))
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(
            img,
            tuple(int(v) for v in p1),
            tuple(int(v) for v in p2),
            (grey,) * 3,
            int(rng.integers(1, 4)),
            cv2.LINE_AA,
        )
    return img


def _polygon(
    shape: str, rng: np.random.Generator, cx: float, cy: float, w: float, h: float
) -> list[np.ndarray]:
    """Outline point sets (a ring is two) in pixel coordinates."""
    if shape in ("ellipse", "ring"):
        angle = int(rng.uniform(0, 180))
        pts = cv2.ellipse2Poly((int(cx), int(cy)), (max(1, int(w / 2)), max(1, int(h / 2))), angle, 0, 360, 4)
        return [pts.astype(np.float32)]
    if shape == "rectangle":
        base = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
        theta = np.deg2rad(rng.uniform(-15, 15))
    elif shape == "triangle":
        base = np.array([[0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
        theta = np.deg2rad(rng.uniform(-30, 30))
    elif shape == "diamond":
        base = np.array([[0, -0.5], [0.5, 0], [0, 0.5], [-0.5, 0]])
        theta = 0.0
    elif shape == "cross":
        a, b = 0.5, 0.17
        base = np.array(
            [
                [-b, -a],
                [b, -a],
                [b, -b],
                [a, -b],
                [a, b],
                [b, b],
                [b, a],
                [-b, a],
                [-b, b],
                [-a, b],
                [-a, -b],
                [-b, -b],
            ]
        )
        theta = np.deg2rad(rng.uniform(-20, 20))
    elif shape == "hexagon":
        t = np.arange(6) * np.pi / 3
        base = 0.5 * np.stack([np.cos(t), np.sin(t)], 1)
        theta = rng.uniform(0, np.pi / 3)
    elif shape == "star":
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 0.5, 0.22)
        base = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        theta = rng.uniform(-0.3, 0.3)
    else:
        raise ValueError(shape)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = (base * [w, h]) @ rot.T + [cx, cy]
    return [pts.astype(np.float32)]


def _overlap(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over the SMALLER box: how much of either object can be hidden."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (np.minimum(area(box), area(boxes)) + 1e-9)


def _box_of(polys: list[np.ndarray], size: int) -> np.ndarray:
    """The xyxy box around outline points (pixel ends inclusive), inside the image."""
    pts = np.concatenate(polys)
    box = np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max() + 1, pts[:, 1].max() + 1], np.float32)
    return np.clip(box, 0, size)


def _draw_shape(img: np.ndarray, shape: str, polys: list[np.ndarray], fill: tuple[int, ...], side: float,
                short_side: float) -> float:
    """Draw one object (filled with a darker outline; a ring as a thick line) and return how far a
    ring's ink reaches beyond its outline (0 for filled shapes), which its box must include."""
    ipts = [np.round(p).astype(np.int32) for p in polys]
    if shape == "ring":
        thick = max(2, int(short_side * 0.18))
        cv2.polylines(img, ipts, True, fill, thick, cv2.LINE_AA)
        return thick / 2
    cv2.fillPoly(img, ipts, fill, cv2.LINE_AA)
    cv2.polylines(img, ipts, True, tuple(int(v * 0.55) for v in fill), max(1, int(side / 40)), cv2.LINE_AA)
    return 0.0


def render_image(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB image, boxes xyxy [n,4], labels [n]) for one generated sample."""
    s = cfg.size
    img = _background(rng, s, cfg.texture)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        cls = int(rng.integers(cfg.num_classes))
        shape, colour = SHAPES[cls]
        lo, hi = cfg.small_size if rng.random() < cfg.small_fraction else cfg.object_size
        for _attempt in range(20):
            side = rng.uniform(lo, hi) * s
            aspect = (
                rng.uniform(0.7, 1.4)
                if shape in ("rectangle", "ellipse", "ring", "diamond")
                else rng.uniform(0.85, 1.15)
            )
            w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
            cx, cy = (
                rng.uniform(w / 2, s - w / 2) if w < s else s / 2,
                rng.uniform(h / 2, s - h / 2) if h < s else s / 2,
            )
            polys = _polygon(shape, rng, cx, cy, w, h)
            box = _box_of(polys, s)
            if (box[2] - box[0]) < 3 or (box[3] - box[1]) < 3:
                continue
            if len(boxes) and _overlap(box, np.stack(boxes)).max() > cfg.max_overlap:
                continue
            jitter = rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, 3)
            fill = tuple(int(v) for v in np.clip(np.array(colour) + jitter, 0, 255))
            half = _draw_shape(img, shape, polys, fill, side, min(w, h))
            if half:
                box = np.clip(box + np.array([-half, -half, half, half], np.float32), 0, s)
            boxes.append(box)
            labels.append(cls)
            break
    return img, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)


def moving_shapes(frames: int = 90, objects: int = 3, size: int = 160, num_classes: int = 3, seed: int = 0,
                  object_size: tuple[float, float] = (0.25, 0.35), speed: tuple[float, float] = (1.0, 3.0),
                  texture: float = 0.3) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """A clip with known tracks: (RGB frame, boxes xyxy [n,4], labels [n], track ids [n], from 1) per frame.

    The training data's shapes and colours (so a detector trained on :func:`synthetic_dataset`
    sees them) move at constant velocity over one fixed background and bounce off its edges;
    object ``k`` is class ``k % num_classes`` and keeps its size, rotation and colour. Later
    objects are drawn over earlier ones where their paths cross, as occlusions in a real video.
    """
    rng = np.random.default_rng(seed)
    background = _background(rng, size, texture)
    state = []
    for k in range(objects):
        side = rng.uniform(*object_size) * size
        pos = rng.uniform(side / 2 + 1, size - side / 2 - 1, 2)
        angle = rng.uniform(0, 2 * np.pi)
        vel = rng.uniform(*speed) * np.array([np.cos(angle), np.sin(angle)])
        state.append({"cls": k % num_classes, "side": side, "pos": pos, "vel": vel, "seed": int(rng.integers(1 << 31))})
    for _ in range(frames):
        img = background.copy()
        boxes, labels, ids = [], [], []
        for k, obj in enumerate(state):
            shape, colour = SHAPES[obj["cls"]]
            side, (cx, cy) = obj["side"], obj["pos"]
            polys = _polygon(shape, np.random.default_rng(obj["seed"]), cx, cy, side, side)
            half = _draw_shape(img, shape, polys, colour, side, side)
            boxes.append(np.clip(_box_of(polys, size) + np.array([-half, -half, half, half], np.float32), 0, size))
            labels.append(obj["cls"])
            ids.append(k + 1)
            obj["pos"] = obj["pos"] + obj["vel"]
            for axis in range(2):  # bounce off the edges
                low, high = side / 2, size - side / 2
                if not low <= obj["pos"][axis] <= high:
                    obj["vel"][axis] *= -1
                    obj["pos"][axis] = np.clip(obj["pos"][axis], low, high)
        yield img, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64), np.array(ids, np.int64)


def _write_split(cfg: SyntheticConfig, out: Path, split: str, split_id: int, count: int) -> None:
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in tqdm(range(count), desc=f"synthetic {split}", unit="img", leave=False, disable=count < 50):
        rng = np.random.default_rng([cfg.seed, split_id, i])
        img, boxes, labels = render_image(cfg, rng)
        path = folder / f"{split}_{i:06d}.jpg"
        Image.fromarray(img).save(path, quality=cfg.jpeg_quality)
        records.append(ImageRecord(path, i, cfg.size, cfg.size, boxes, labels))
    info = {"description": "detectkit synthetic shapes", "config": asdict(cfg), "generator_version": GENERATOR_VERSION}
    write_coco(folder / "annotations.json", records, synthetic_class_names(cfg.num_classes), info,
               supercategory="shape", decimals=2)


def generate_synthetic(out: str | Path, cfg: SyntheticConfig | None = None) -> Path:
    """Write ``out/train`` and ``out/val``, each with images and a COCO ``annotations.json``."""
    cfg = cfg or SyntheticConfig()
    out = Path(out)
    _write_split(cfg, out, "train", 0, cfg.train_images)
    if cfg.val_images > 0:
        _write_split(cfg, out, "val", 1, cfg.val_images)
    return out


def default_cache_dir() -> Path:
    root = os.environ.get("DETECTKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "detectkit")
    return Path(root) / "synthetic"


def synthetic_dataset(cfg: SyntheticConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    """The dataset for ``cfg``, generated once into ``cache_dir/<config hash>`` (atomic rename,
    so concurrent processes never see half a dataset)."""
    cfg = cfg or SyntheticConfig()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / cfg.digest()
    if (final / ".complete").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{cfg.digest()}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("generating the synthetic dataset into %s", final)
    generate_synthetic(tmp, cfg)
    (tmp / ".complete").write_text(cfg.digest())
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        if not (final / ".complete").is_file():
            raise
    return final
