"""`detectkit data inspect`: what a dataset holds and everything wrong with it, per file."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from detectkit.data.formats.detect import open_dataset
from detectkit.data.images import check_images
from detectkit.data.records import DatasetError, Problem

__all__ = ["inspect_dataset", "format_report"]


def inspect_dataset(
    path: str | Path,
    decode_images: bool = True,
    progress: bool = False,
    class_names: list[str] | None = None,
) -> dict:
    """``{"format", "classes", "class_order", "splits": {name: {...}}, "problems"}``.

    Split names are the dataset's own. Per split: ``images`` and ``boxes`` (usable images, boxes
    kept after cleaning: clipped boxes count, dropped ones do not), ``per_class``,
    ``background_images`` (usable images without a box, whatever the reason),
    ``empty_label_files`` and ``unlabeled_images`` (images without a label file; both are trained
    as background). ``class_order`` says where the class order comes from (``source``: ``file``,
    ``given`` or ``sorted``; ``detail``: the file, or what was sorted). ``decode_images`` fully decodes every
    image (finds truncated files); otherwise only headers are read. Each problem names its file
    and its ``split`` (``None`` for the dataset as a whole: ``nc`` vs ``names``, a split folder
    without its data.yaml key, VOC classes inferred from the XML files);
    ``severity == "fatal"`` marks what makes a split unreadable. ``class_names``: the class list
    of a VOC or CreateML set (see :func:`open_dataset`).
    """
    report: dict = {"format": None, "classes": [], "class_order": None, "splits": {}, "problems": []}
    # readers log a summary of their problems; the report lists them all, so keep logs quiet
    logger = logging.getLogger("detectkit.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        try:
            src = open_dataset(path, class_names)
            report["format"] = src.format
            report["classes"] = src.class_names
            report["class_order"] = src.class_order
            report["problems"].extend({**p.to_dict(), "split": None} for p in src.problems)
        except DatasetError as e:
            report["problems"].append(Problem("unreadable_dataset", str(path), str(e), "fatal").to_dict())
            return report
        for name in src.splits:
            try:
                split = src.load(name)
            except DatasetError as e:
                report["problems"].append(
                    {**Problem("unreadable_split", str(path), str(e), "fatal").to_dict(), "split": name}
                )
                continue
            bad = {
                p.file
                for p in check_images(split, decode=decode_images, progress=progress)
                if p.severity == "error"
            }
            good = [r for r in split.records if str(r.path) not in bad]
            per_class = dict.fromkeys(split.class_names, 0)
            for r in good:
                for label in r.labels.tolist():
                    per_class[split.class_names[label]] += 1
            kinds = Counter(p.kind for p in split.problems)
            report["splits"][name] = {
                "images": len(good),
                "boxes": int(sum(r.num_boxes for r in good)),
                "per_class": per_class,
                "background_images": sum(1 for r in good if r.num_boxes == 0),
                "empty_label_files": kinds["empty_label"],
                "unlabeled_images": kinds["missing_label"],
            }
            report["problems"].extend({**p.to_dict(), "split": name} for p in split.problems)
    finally:
        logger.setLevel(level)
    return report


def has_fatal(report: dict) -> bool:
    return any(p["severity"] == "fatal" for p in report["problems"])


def format_report(report: dict, max_problems: int = 50) -> str:
    """Human-readable table of the report."""
    lines = [f"format:  {report['format']}", f"classes: {len(report['classes'])} {report['classes']}"]
    if report.get("class_order"):
        order = report["class_order"]
        lines.append(f"class order: {order['source']} ({order['detail']})")
    lines.append("")
    names = report["classes"]
    header = (f"{'split':<10}{'images':>8}{'boxes':>8}{'no box':>8}  "
              + "  ".join(f"{n[:12]:>12}" for n in names))
    lines.append(header)
    lines.append("-" * len(header))
    for split, s in report["splits"].items():
        per = "  ".join(f"{s['per_class'].get(n, 0):>12}" for n in names)
        lines.append(f"{split:<10}{s['images']:>8}{s['boxes']:>8}{s['background_images']:>8}  {per}")
    for split, s in report["splits"].items():
        if s["empty_label_files"] or s["unlabeled_images"]:
            lines.append(f"{split}: {s['empty_label_files']} empty label file(s), {s['unlabeled_images']} image(s) "
                         "without a label file (trained as background images)")
    probs = report["problems"]
    lines.append("")
    if not probs:
        lines.append("no problems found")
    else:
        kinds = Counter(p["kind"] for p in probs)
        lines.append(f"{len(probs)} problem(s): " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
        for p in probs[:max_problems]:
            lines.append(f"  [{p['severity']}] {p['kind']}: {p['file']}: {p['message']}")
        if len(probs) > max_problems:
            lines.append(f"  ... {len(probs) - max_problems} more (use --json for all)")
    return "\n".join(lines)
