"""`detectkit data synth|inspect|convert` (argparse). The main CLI mounts these with
:func:`add_data_subcommands`; ``python -m detectkit.data.commands ...`` runs them directly."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

__all__ = ["add_data_subcommands", "run_data_command", "main"]


def add_data_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``synth``, ``inspect`` and ``convert``; each sets ``args.data_command``."""
    p = subparsers.add_parser("synth", help="generate the synthetic shapes dataset (COCO format)")
    p.add_argument("out", help="output folder (gets train/ and val/, each with annotations.json)")
    p.add_argument("--images", type=int, default=512, help="training images")
    p.add_argument("--val", type=int, default=64, help="validation images")
    p.add_argument("--size", type=int, default=320, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=3, help="number of classes (1-8; shape+colour each)")
    p.add_argument(
        "--objects", type=int, nargs=2, default=(1, 4), metavar=("MIN", "MAX"), help="objects per image"
    )
    p.add_argument(
        "--object-size",
        type=float,
        nargs=2,
        default=(0.15, 0.5),
        metavar=("LO", "HI"),
        help="fraction of the side",
    )
    p.add_argument("--small-fraction", type=float, default=0.2, help="share of small objects")
    p.add_argument("--texture", type=float, default=0.5, help="background clutter 0..1")
    p.add_argument(
        "--max-overlap", type=float, default=0.35, help="largest intersection over the smaller box"
    )
    p.set_defaults(data_command="synth")

    p = subparsers.add_parser("inspect", help="classes, per-split counts and every problem of a dataset")
    p.add_argument("path", help="dataset folder or annotation file (COCO, Roboflow, YOLO, VOC, CreateML)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--fast", action="store_true", help="read image headers only (no full decode)")
    _add_classes(p)
    p.set_defaults(data_command="inspect")

    p = subparsers.add_parser("convert", help="convert a dataset to COCO JSON (or YOLO txt), per split")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=("coco", "yolo"), default="coco")
    p.add_argument("--no-copy", action="store_true", help="write annotations only (images are not copied)")
    _add_classes(p)
    p.set_defaults(data_command="convert")


def _add_classes(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--classes",
        default=None,
        help="class list of a VOC/CreateML set: comma-separated names or a text file with one per line "
        "(default: the set's labelmap.txt/classes.txt, else the names found)",
    )


def _classes(value: str | None) -> list[str] | None:
    """``--classes``: a file of names (one per line) or a comma-separated list."""
    if value is None:
        return None
    from pathlib import Path

    if Path(value).is_file():
        text = Path(value).read_text(encoding="utf-8-sig")
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [n.strip() for n in value.split(",") if n.strip()]


def run_data_command(args: argparse.Namespace) -> int:
    """Run the parsed command; returns the process exit code."""
    from detectkit.data.records import DatasetError

    command = getattr(args, "data_command", None)
    try:
        if command == "synth":
            from detectkit.data.synthetic import SyntheticConfig, generate_synthetic

            cfg = SyntheticConfig(
                train_images=args.images,
                val_images=args.val,
                size=args.size,
                num_classes=args.classes,
                seed=args.seed,
                min_objects=args.objects[0],
                max_objects=args.objects[1],
                object_size=tuple(args.object_size),
                small_fraction=args.small_fraction,
                texture=args.texture,
                max_overlap=args.max_overlap,
            )
            out = generate_synthetic(args.out, cfg)
            print(
                f"wrote {cfg.train_images} train + {cfg.val_images} val images ({cfg.num_classes} classes) to {out}"
            )
            return 0
        if command == "inspect":
            from detectkit.data.inspect import format_report, has_fatal, inspect_dataset

            report = inspect_dataset(
                args.path, decode_images=not args.fast, progress=not args.json, class_names=_classes(args.classes)
            )
            if args.json:
                sys.stdout.write(json.dumps(report) + "\n")
            else:
                print(format_report(report))
            return 1 if has_fatal(report) else 0
        if command == "convert":
            from detectkit.data.convert import convert_dataset

            summary = convert_dataset(
                args.src, args.dst, to=args.to, copy_images=not args.no_copy, class_names=_classes(args.classes)
            )
            for name, s in summary["splits"].items():
                extra = f", {s['skipped']} unusable image(s) left out" if s["skipped"] else ""
                print(f"{name}: {s['images']} images, {s['boxes']} boxes{extra}")
            print(f"{summary['format']} -> {summary['to']}: {summary['output']}")
            return 0
    except (DatasetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"error: unknown data command {command!r} (synth, inspect, convert)", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    parser = argparse.ArgumentParser(prog="detectkit data", description="dataset tools")
    sub = parser.add_subparsers(dest="data_command", required=True)
    add_data_subcommands(sub)
    return run_data_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
