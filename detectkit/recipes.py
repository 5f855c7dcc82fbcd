"""The shipped recipes (``experiments/**/*.yaml``), addressable by name from anywhere.

A pip user has no checkout, so ``--config experiments/quickstart.yaml`` points at nothing; the
wheel ships the recipes as package data (``detectkit/experiments/``) and ``--config quickstart``
finds them. In a checkout (or an editable install) the same names resolve to the repository's
``experiments/`` folder. An existing path always wins, so a user's own ``quickstart.yaml`` in the
working directory is never shadowed. Standard library only: the CLI lists recipes without torch.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from detectkit.errors import OptionParser, UserError

__all__ = ["recipes_dir", "list_recipes", "recipe_path", "resolve", "resolve_config_args", "describe", "main"]

_PACKAGE = Path(__file__).resolve().parent
_SUFFIXES = (".yaml", ".yml")


def recipes_dir() -> Path:
    """Where the recipes are: inside the installed package, else the checkout's ``experiments/``."""
    installed = _PACKAGE / "experiments"
    return installed if installed.is_dir() else _PACKAGE.parent / "experiments"


def list_recipes(root: Path | None = None) -> dict[str, Path]:
    """``name -> file`` for every recipe; the name is the path below the folder without ``.yaml``
    (``quickstart``, ``nas/foo``), sorted."""
    root = recipes_dir() if root is None else root
    files = [p for suffix in _SUFFIXES for p in root.rglob(f"*{suffix}")] if root.is_dir() else []
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(files)}


def _recipe_name(text: str) -> str:
    """``experiments/nas/x.yaml`` / ``nas/x.yml`` / ``nas/x`` -> ``nas/x`` (the README's old form still works)."""
    name = text.replace(os.sep, "/").removeprefix("./").removeprefix("experiments/")
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def recipe_path(name: str) -> Path:
    """The shipped recipe called ``name``; a :class:`UserError` naming the closest ones otherwise."""
    recipes = list_recipes()
    key = _recipe_name(name)
    if key in recipes:
        return recipes[key]
    close = difflib.get_close_matches(key, list(recipes), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UserError(f"{name}: no such file, and no shipped recipe of that name.{hint} (detectkit recipes lists them)")


def resolve(config: str | os.PathLike) -> Path:
    """A config argument as a file: the path itself when it exists, else the shipped recipe of that name."""
    path = Path(config)
    return path if path.is_file() else recipe_path(str(config))


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``--config NAME`` / ``--config=NAME`` in a LightningCLI argument list, with each NAME resolved."""
    out: list[str] = []
    expect = False
    for arg in args:
        if expect:
            out.append(str(resolve(arg)))
            expect = False
        elif arg == "--config":
            out.append(arg)
            expect = True
        elif arg.startswith("--config="):
            out.append("--config=" + str(resolve(arg.split("=", 1)[1])))
        else:
            out.append(arg)
    return out


def describe(path: Path) -> str:
    """A recipe's one-line description: the text of its first comment line."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text:
            continue
        if not text.startswith("#"):
            break
        text = text.lstrip("#").strip()
        if text:
            return text
    return ""


def main(argv: Sequence[str]) -> int:
    """``detectkit recipes``: one line per recipe; ``detectkit recipes NAME`` prints that recipe's YAML."""
    parser = OptionParser(prog="detectkit recipes",
                          description="The recipes shipped with detectkit. Train one by name: "
                                      "detectkit fit --config quickstart. Copy one to edit it: "
                                      "detectkit recipes quickstart > my.yaml")
    parser.add_argument("name", nargs="?", help="print this recipe's YAML instead of the list")
    parser.add_argument("--path", action="store_true", help="print the file's path instead of its content")
    args = parser.parse_args(list(argv))
    if args.name:
        path = recipe_path(args.name)
        sys.stdout.write(f"{path}\n" if args.path else path.read_text(encoding="utf-8"))
        return 0
    recipes = list_recipes()
    if not recipes:
        raise UserError(f"no recipes found in {recipes_dir()} (a broken installation?)")
    width = max(len(n) for n in recipes)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {describe(path)}" if not args.path else f"{name:<{width}}  {path}")
    return 0
