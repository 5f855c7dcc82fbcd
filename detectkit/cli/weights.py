"""``detectkit weights``: list the published checkpoints, and fetch one into the cache.

``detectkit weights list`` shows each model's published weights, whether they are cached, how
their sha256 is known and their licence; ``detectkit weights download NAME`` fetches them
(``--url``, or ``$DETECTKIT_WEIGHTS_URL``, names a mirror), checks the digest, reads the file
with the safe loader and prints where it is and its licence.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from detectkit.models.pretrained import PRETRAINED, URL_ENV, fetch, file_sha256, source_url, weights_dir

__all__ = ["main", "weights_table"]


def weights_table() -> list[dict]:
    """One row per published checkpoint, with where it is (or would be) cached."""
    rows = []
    for model, tags in PRETRAINED.items():
        for tag, entry in tags.items():
            path = weights_dir() / entry.file_name
            rows.append({
                "model": model, "tag": tag, "file": entry.file_name, "url": source_url(entry),
                "cached": str(path) if path.is_file() else None,
                "sha256": entry.sha256 or "recorded at first download (none published)",
                "license": entry.license,
            })
    return rows


def _print_table(rows: list[dict]) -> None:
    width = max(len(f"{r['model']}/{r['tag']}") for r in rows)
    print(f"cache folder: {weights_dir()}")
    for r in rows:
        state = "cached" if r["cached"] else "not cached"
        licence = "AGPL-3.0" if "AGPL" in r["license"] else "YOLO-NAS license (Deci; no commercial use)"
        print(f"  {r['model'] + '/' + r['tag']:<{width}}  {r['file']:<22} {state:<11} {licence}")
    print("`detectkit weights download NAME` fetches one; licences in full: --json")


def _download(args: argparse.Namespace) -> int:
    from detectkit.checkpoint import CheckpointError, read_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.name not in PRETRAINED:
        from detectkit.errors import UserError, suggest

        raise UserError(f"no published weights for {args.name!r}.{suggest(args.name, list(PRETRAINED))} "
                        f"Known: {', '.join(PRETRAINED)}")
    path = fetch(args.name, args.tag, base_url=args.url, force=args.force)
    try:
        read_checkpoint(path)  # the restricted unpickler: a file that needs arbitrary code is refused
    except CheckpointError as e:
        for stale in (path, path.with_name(path.name + ".sha256")):  # a retry must fetch afresh
            stale.unlink(missing_ok=True)
        raise SystemExit(f"{path}: removed: the safe loader refuses it ({e})") from None
    entry = PRETRAINED[args.name][args.tag or next(iter(PRETRAINED[args.name]))]
    print(f"{args.name}: {path}")
    print(f"sha256: {file_sha256(path)} ({'published' if entry.sha256 else 'recorded at first download'})")
    print(f"licence: {entry.license}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from detectkit.errors import OptionParser

    parser = OptionParser(prog="detectkit weights", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="the published checkpoints, cached or not, and their licences")
    ls.add_argument("--json", action="store_true", help="one JSON list (full licences and URLs)")
    dl = sub.add_parser("download", help="fetch one into the cache (sha256-checked)")
    dl.add_argument("name", help="a model name from `detectkit weights list` (yolo_nas_s, yolo_world_v2_l, ...)")
    dl.add_argument("--tag", default=None, help="which of its weights (default: the first, coco)")
    dl.add_argument("--url", default=None, help=f"a mirror folder to fetch from (default: ${URL_ENV}, else the home)")
    dl.add_argument("--force", action="store_true", help="download again over a cached copy")
    args = parser.parse_args(argv)
    if args.action == "list":
        rows = weights_table()
        print(json.dumps(rows)) if args.json else _print_table(rows)
        return 0
    return _download(args)


if __name__ == "__main__":
    sys.exit(main())
