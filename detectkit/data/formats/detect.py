"""Pick the reader from a path, so every command and the DataModule accept any supported layout.

:func:`open_dataset` returns a :class:`DatasetSource`: the format, the dataset's OWN split
names (Roboflow says ``valid``, ultralytics ``val``), the class names (read from annotation
files only, cheap), where their order comes from (``class_order``), ``problems`` about the
dataset as a whole (``nc`` disagreeing with ``names``, a split folder found without its data.yaml
key, VOC's ``trainval`` list, likely typos among class names read from annotations) and
``load(split)`` accepting aliases (``val`` finds ``valid``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from detectkit.data.formats.coco import coco_categories, load_coco, load_coco_json
from detectkit.data.formats.createml import createml_labels, createml_typos, load_createml, read_createml
from detectkit.data.formats.voc import load_voc, voc_class_order, voc_classes, voc_root, voc_split_layout
from detectkit.data.formats.yolo import load_yolo, read_data_yaml, yolo_class_names, yolo_layout
from detectkit.data.images import IMAGE_EXTENSIONS
from detectkit.data.records import SPLIT_ALIASES, DatasetError, DetectionSplit, Problem

__all__ = ["DatasetSource", "open_dataset", "load_dataset", "canonical_split", "FORMATS"]

FORMATS = ("coco", "roboflow-coco", "yolo", "voc", "createml")
COCO_FILE_NAMES = ("_annotations.coco.json", "annotations.json", "annotations.coco.json")
CREATEML_FILE = "_annotations.createml.json"


def canonical_split(name: str) -> str:
    """``valid`` -> ``val``; unknown names are returned unchanged."""
    for canon, aliases in SPLIT_ALIASES.items():
        if name.lower() in aliases:
            return canon
    return name


@dataclass
class DatasetSource:
    format: str
    root: Path
    splits: list[str]
    _classes: Callable[[], list[str]]
    _load: Callable[[str], DetectionSplit]
    _problems: Callable[[], list[Problem]] = field(default=lambda: [])
    _order: Callable[[], dict[str, str]] = field(default=lambda: {"source": "unknown", "detail": ""})

    @property
    def class_names(self) -> list[str]:
        return self._classes()

    @property
    def class_order(self) -> dict[str, str]:
        """Where the class order comes from: ``{"source": "file" | "given" | "sorted", "detail"}``
        (a file's list; the caller's ``class_names``; the names found in the annotations, sorted)."""
        return self._order()

    @property
    def problems(self) -> list[Problem]:
        """What is wrong with (or was guessed about) the dataset as a whole, not one split."""
        return self._problems()

    def resolve_split(self, split: str | None) -> str:
        if split is None:
            if len(self.splits) == 1:
                return self.splits[0]
            raise DatasetError(f"{self.root}: holds splits {self.splits}; say which one")
        if split in self.splits:
            return split
        matches = [s for s in self.splits if canonical_split(s) == canonical_split(split)]
        if not matches:
            raise DatasetError(f"{self.root}: no '{split}' split (has {self.splits})")
        return matches[0]

    def load(self, split: str | None = None) -> DetectionSplit:
        return self._load(self.resolve_split(split))


def _coco_file_in(d: Path) -> Path | None:
    return next((d / n for n in COCO_FILE_NAMES if (d / n).is_file()), None)


def _coco_image_dir(json_path: Path, data: dict) -> Path:
    """Images next to the JSON (Roboflow), or in the standard COCO places for ``annotations/x.json``."""
    first = next(
        (im["file_name"] for im in data.get("images", []) if isinstance(im, dict) and isinstance(im.get("file_name"), str)),
        None,
    )
    stem = json_path.stem.replace("instances_", "")
    root = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    for d in (json_path.parent, root / stem, root / "images" / stem, root / "images", root):
        if first is None or (d / first).exists():
            return d
    return json_path.parent


def _given(found: list[str], given: list[str] | None, where: Path) -> list[str]:
    """Formats whose files carry the class list: a ``class_names`` argument may only confirm it."""
    if given is not None and list(given) != list(found):
        raise DatasetError(f"{where}: the dataset's classes {found} differ from class_names {list(given)}")
    return found


def _classes_once(fn: Callable[[], list[str]]) -> Callable[[], list[str]]:
    cache: list[list[str]] = []

    def get() -> list[str]:
        if not cache:
            cache.append(fn())
        return cache[0]

    return get


def _coco_source(
    files: dict[str, Path], root: Path, fmt: str, class_names: list[str] | None = None
) -> DatasetSource:
    first = next(iter(files.values()))

    def classes() -> list[str]:
        return _given(coco_categories(load_coco_json(first), first)[0], class_names, first)

    classes = _classes_once(classes)

    def load(split: str) -> DetectionSplit:
        path = files[split]
        data = load_coco_json(path)
        return load_coco(path, _coco_image_dir(path, data), split, classes(), fmt)

    def order() -> dict[str, str]:
        return {"source": "file", "detail": f"{first} (categories, by id)"}

    return DatasetSource(fmt, root, list(files), classes, load, _order=order)


def _createml_source(
    files: dict[str, Path], root: Path, class_names: list[str] | None = None
) -> DatasetSource:
    # CreateML files carry no class list: a given one fixes the order (labels outside it are problems)
    classes = _classes_once(
        lambda: list(class_names) if class_names is not None else createml_labels(list(files.values()))
    )
    paths = list(files.values())
    if class_names is not None:
        order = {"source": "given", "detail": "the class_names / --classes list"}
    else:
        order = {"source": "sorted", "detail": "the labels found in the CreateML files (pass the "
                 "class list to fix the order)"}
    return DatasetSource(
        "createml", root, list(files), classes, lambda s: load_createml(files[s], s, classes()),
        lambda: [] if class_names is not None else createml_typos(paths),
        lambda: order,
    )


def _yolo_source(yaml_path: Path, class_names: list[str] | None) -> DatasetSource:
    splits, problems = yolo_layout(yaml_path)
    classes = _classes_once(lambda: _given(yolo_class_names(yaml_path), class_names, yaml_path))
    return DatasetSource(
        "yolo",
        yaml_path.parent,
        list(splits),
        classes,
        lambda s: load_yolo(yaml_path, s),
        lambda: problems,
        lambda: {"source": "file", "detail": f"{yaml_path} (names)"},
    )


def _find_yaml(d: Path) -> Path | None:
    for name in ("data.yaml", "data.yml", "dataset.yaml"):
        if (d / name).is_file():
            return d / name
    for p in sorted(d.glob("*.y*ml")):
        try:
            if "names" in read_data_yaml(p):
                return p
        except DatasetError:
            continue
    return None


def _split_order(name: str) -> tuple[int, str]:
    order = {"train": 0, "val": 1, "test": 2}
    return order.get(canonical_split(name), 3), name


def _voc_source(root: Path, class_names: list[str] | None) -> DatasetSource:
    splits, layout_problems = voc_split_layout(root)
    found: list = []

    def classes_and_problems() -> tuple[list[str], list[Problem]]:
        if not found:
            found.append(voc_classes(root, class_names))
        return found[0]

    return DatasetSource(
        "voc",
        root,
        splits,
        lambda: classes_and_problems()[0],
        lambda s: load_voc(root, s, classes_and_problems()[0]),
        lambda: layout_problems + classes_and_problems()[1],
        lambda: voc_class_order(root, class_names),
    )


def open_dataset(path: str | Path, class_names: list[str] | None = None) -> DatasetSource:
    """Detect the format of ``path`` (a file or a folder) and describe its splits.

    ``class_names`` is the class list for formats whose files do not carry one (VOC, CreateML):
    it fixes the class order, and an object named otherwise is a problem naming its file. For
    COCO and YOLO it must equal the file's list.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: dataset path does not exist")
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):
            return _yolo_source(path, class_names)
        if path.suffix == ".json":
            try:
                data = read_createml(path)
            except DatasetError:
                data = None
            if data is not None:
                return _createml_source({path.parent.name or "all": path}, path.parent, class_names)
            split = path.parent.name if path.name in COCO_FILE_NAMES else path.stem.replace("instances_", "")
            return _coco_source({split: path}, path.parent, "coco", class_names)
        raise DatasetError(f"{path}: not a dataset file (expected .json, data.yaml or a folder)")
    if (y := _find_yaml(path)) is not None:
        return _yolo_source(y, class_names)
    if (c := _coco_file_in(path)) is not None:
        fmt = "roboflow-coco" if c.name == COCO_FILE_NAMES[0] else "coco"
        return _coco_source({path.name: c}, path, fmt, class_names)
    if (path / CREATEML_FILE).is_file():
        return _createml_source({path.name: path / CREATEML_FILE}, path, class_names)
    subdirs = sorted((d for d in path.iterdir() if d.is_dir()), key=lambda d: _split_order(d.name))
    coco = {d.name: f for d in subdirs if (f := _coco_file_in(d)) is not None}
    if coco:
        fmt = "roboflow-coco" if all(f.name == COCO_FILE_NAMES[0] for f in coco.values()) else "coco"
        return _coco_source(coco, path, fmt, class_names)
    createml = {d.name: d / CREATEML_FILE for d in subdirs if (d / CREATEML_FILE).is_file()}
    if createml:
        return _createml_source(createml, path, class_names)
    if (path / "annotations").is_dir():
        files = sorted(
            (path / "annotations").glob("*.json"),
            key=lambda f: _split_order(f.stem.replace("instances_", "")),
        )
        files = [f for f in files if f.stem.startswith("instances_")] or files
        if files:
            return _coco_source(
                {f.stem.replace("instances_", ""): f for f in files}, path, "coco", class_names
            )
    if (root := voc_root(path)) is not None:
        return _voc_source(root, class_names)
    if (path / "images").is_dir() and (path / "labels").is_dir():
        raise DatasetError(f"{path}: YOLO images/ and labels/ but no data.yaml with the class names")
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
        raise DatasetError(
            f"{path}: a folder of images without annotations (no COCO JSON, data.yaml, VOC XML or CreateML)"
        )
    raise DatasetError(
        f"{path}: no supported dataset found (COCO JSON, Roboflow export, YOLO data.yaml, Pascal VOC, CreateML)"
    )


def load_dataset(
    path: str | Path, split: str | None = None, class_names: list[str] | None = None
) -> DetectionSplit:
    """Read one split of any supported dataset (``split`` may be an alias or omitted for one-split paths)."""
    return open_dataset(path, class_names).load(split)
