"""`detectkit data inspect`: what a dataset holds and everything wrong with it, per file."""

from __future__ import annotations

import logging
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
    """``{"format", "classes", "splits": {name: {"images", "boxes", "per_class"}}, "problems"}``.

    Split names are the dataset's own. Counts are of usable images and of the boxes kept after
    cleaning (clipped boxes count, dropped ones do not). ``decode_images`` fully decodes every
    image (finds truncated files); otherwise only headers are read. Each problem names its file
    and its ``split`` (``None`` for the dataset as a whole: ``nc`` vs ``names``, a split folder
    without its data.yaml key, VOC classes inferred from the XML files);
    ``severity == "fatal"`` marks what makes a split unreadable. ``class_names``: the class list
    of a VOC or CreateML set (see :func:`open_dataset`).
    """
    report: dict = {"format": None, "classes": [], "splits": {}, "problems": []}
    # readers log a summary of their problems; the report lists them all, so keep logs quiet
    logger = logging.getLogger("detectkit.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        try:
            src = open_dataset(path, class_names)
            report["format"] = src.format
            report["classes"] = src.class_names
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
            report["splits"][name] = {
                "images": len(good),
                "boxes": int(sum(r.num_boxes for r in good)),
                "per_class": per_class,
            }
            report["problems"].extend({**p.to_dict(), "split": name} for p in split.problems)
    finally:
        logger.setLevel(level)
    return report


def has_fatal(report: dict) -> bool:
    return any(p["severity"] == "fatal" for p in report["problems"])


def format_report(report: dict, max_problems: int = 50) -> str:
    """Human-readable table of the report."""
    lines = [f"format:  {report['format']}", f"classes: {len(report['classes'])} {report['classes']}", ""]
    names = report["classes"]
    header = f"{'split':<10}{'images':>8}{'boxes':>8}  " + "  ".join(f"{n[:12]:>12}" for n in names)
    lines.append(header)
    lines.append("-" * len(header))
    for split, s in report["splits"].items():
        per = "  ".join(f"{s['per_class'].get(n, 0):>12}" for n in names)
        lines.append(f"{split:<10}{s['images']:>8}{s['boxes']:>8}  {per}")
    probs = report["problems"]
    lines.append("")
    if not probs:
        lines.append("no problems found")
    else:
        from collections import Counter

        kinds = Counter(p["kind"] for p in probs)
        lines.append(f"{len(probs)} problem(s): " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
        for p in probs[:max_problems]:
            lines.append(f"  [{p['severity']}] {p['kind']}: {p['file']}: {p['message']}")
        if len(probs) > max_problems:
            lines.append(f"  ... {len(probs) - max_problems} more (use --json for all)")
    return "\n".join(lines)
