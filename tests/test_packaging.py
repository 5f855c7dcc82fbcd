"""The wheel is the product: what ``pip wheel .`` builds ships every package and recipe, resolves
recipes by name outside the checkout, declares only what detectkit imports, and the README names
only commands and options that exist. The fresh-venv install + fit + predict runs in
``.ci/wheel-check`` (a CI step: minutes and gigabytes, too heavy for the suite)."""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.metadata as md
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import detectkit
from detectkit.cli import main as cli_main
from detectkit.errors import UserError
from detectkit.extras import EXTRA_OF_MODULE, missing_extra_message
from detectkit.recipes import list_recipes, recipe_path, resolve, resolve_config_args

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline"}

#: declared dependencies that no detectkit module imports by name, and why they are declared
NOT_IMPORTED = {
    "jsonargparse": "LightningCLI's parser: Lightning imports it when fit/validate/test/predict --config run; "
                    "the [signatures] extra is what lets it read the classes' signatures and docstrings",
    "python-multipart": "starlette's form parser: serve/gate.py's multipart uploads (Request.form) need it",
}


def build_wheel(source: Path, out: Path) -> Path:
    """``pip wheel --no-deps`` (no build isolation: the suite's setuptools, no index access)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
                   check=True, env=ENV, capture_output=True, text=True)
    (wheel,) = out.glob("detectkit-*.whl")
    return wheel


def package_folders(root: Path) -> set[str]:
    """Every folder of the source tree holding Python code, as the import name it ships as."""
    names = set()
    for top, prefix in (("detectkit", "detectkit"), ("callbacks", "detectkit.callbacks")):
        for py in (root / top).rglob("*.py"):
            rel = py.parent.relative_to(root / top)
            if "__pycache__" not in rel.parts:
                names.add(".".join([prefix, *rel.parts]))
    return names


def shipped_packages(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {str(Path(n).parent).replace("/", ".") for n in z.namelist() if n.endswith("/__init__.py")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


def wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


def declared(wheel: Path) -> dict[str, set[str]]:
    """``{"": base distributions, extra: its distributions}`` from the wheel's Requires-Dist."""
    out: dict[str, set[str]] = {extra: set() for extra in wheel_metadata(wheel).get_all("Provides-Extra")}
    out[""] = set()
    for req in wheel_metadata(wheel).get_all("Requires-Dist"):
        extra = re.search(r"extra\s*==\s*['\"]([\w-]+)['\"]", req)
        out[extra.group(1) if extra else ""].add(_dist_name(req))
    return out


def test_wheel_ships_every_package_folder_and_recipe(wheel):
    assert package_folders(ROOT) - shipped_packages(wheel) == set()
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    recipes = {p.relative_to(ROOT / "experiments").as_posix() for p in (ROOT / "experiments").rglob("*.yaml")}
    assert recipes and {f"detectkit/experiments/{r}" for r in recipes} <= names
    assert "detectkit/cli/__init__.py" in names and "detectkit/predict/__init__.py" in names


def test_wheel_metadata_fit_for_an_index(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
        names = z.namelist()
        entry_points = z.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    assert meta["Version"] == detectkit.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert len(meta.get_all("Classifier")) >= 5 and not meta.get_all("Project-URL")  # no made-up URLs
    requires = meta.get_all("Requires-Dist")
    assert not any(r.startswith("requests") for r in requires)
    # albumentations only through the augment extra (user pipelines): the built-in pipeline is hand-written
    assert [r for r in requires if r.startswith("albumentations")] == ['albumentations>=2.0; extra == "augment"']
    assert "detectkit = detectkit.cli:main" in entry_points
    assert f"## {detectkit.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_a_new_package_folder_ships_without_touching_pyproject(tmp_path):
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("detectkit", "callbacks", "experiments"):
        shutil.copytree(ROOT / name, tree / name, ignore=skip)
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    for folder in ("detectkit/brand_new", "detectkit/brand_new/inner", "callbacks/brand_new_cb"):
        (tree / folder).mkdir()
        (tree / folder / "__init__.py").write_text("VALUE = 1\n")
    (tree / "experiments" / "extra_folder").mkdir()
    (tree / "experiments" / "extra_folder" / "tiny.yaml").write_text("# a new recipe\ntrainer: {max_epochs: 1}\n")
    shipped = shipped_packages(build_wheel(tree, tmp_path / "dist"))
    assert {"detectkit.brand_new", "detectkit.brand_new.inner", "detectkit.callbacks.brand_new_cb"} <= shipped
    assert package_folders(tree) - shipped == set()
    assert (tree / "pyproject.toml").read_bytes() == (ROOT / "pyproject.toml").read_bytes()
    with zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))) as z:
        assert "detectkit/experiments/extra_folder/tiny.yaml" in z.namelist()


def test_installed_wheel_alone_answers_help_and_resolves_recipes_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**ENV, "PYTHONPATH": str(site)}  # ahead of the editable checkout on sys.path

    def run(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "detectkit", *args], cwd=work, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return res.stdout

    out = run("--help")
    assert all(f"  {word} " in out for word in ("fit", "predict", "recipes", "export", "serve", "nas"))
    path = Path(run("recipes", "quickstart", "--path").strip())
    assert path == site / "detectkit" / "experiments" / "quickstart.yaml"
    listing = run("recipes")
    assert "quickstart " in listing and "nas_quickstart " in listing
    config = run("fit", "--config", "quickstart", "--print_config")  # resolved, parsed by LightningCLI
    assert "model: yolo_nas_s" in config and "image_size: 128" in config


def test_recipes_resolve_by_name_a_path_wins_and_unknown_names_get_suggestions(tmp_path, monkeypatch):
    shipped = recipe_path("quickstart")
    assert shipped == ROOT / "experiments" / "quickstart.yaml"
    monkeypatch.chdir(tmp_path)
    assert resolve("quickstart") == shipped
    assert resolve("experiments/quickstart.yaml") == shipped  # the checkout form works from anywhere
    own = tmp_path / "quickstart"
    own.write_text("trainer: {max_epochs: 1}\n")
    assert resolve("quickstart") == Path("quickstart")  # an existing path always wins
    with pytest.raises(UserError, match=r"quikstart: no such file.*Did you mean 'quickstart'"):
        resolve("quikstart")
    assert resolve_config_args(["fit", "--config", "yolo_nas_s_coco", "--config=compress_ptq", "--x", "1"]) == [
        "fit", "--config", str(ROOT / "experiments/yolo_nas_s_coco.yaml"),
        f"--config={ROOT / 'experiments/compress_ptq.yaml'}", "--x", "1"]


def test_recipes_in_subfolders_are_named_by_their_path(tmp_path):
    (tmp_path / "nas").mkdir()
    (tmp_path / "nas" / "big.yaml").write_text("# big\n")
    (tmp_path / "top.yml").write_text("# top\n")
    assert list(list_recipes(tmp_path)) == ["nas/big", "top"]


def test_recipes_command_lists_every_recipe_with_a_description():
    res = subprocess.run([sys.executable, "-m", "detectkit", "recipes"], capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(None, 1) for line in res.stdout.splitlines())
    assert set(lines) == set(list_recipes()) and all(text.strip() for text in lines.values())
    bad = subprocess.run([sys.executable, "-m", "detectkit", "fit", "--config", "quikstart"], capture_output=True,
                         text=True, env=ENV)
    assert bad.returncode != 0 and "Did you mean 'quickstart'" in bad.stderr and len(bad.stderr.splitlines()) == 1


# --------------------------------------------------------------------------- dependencies
def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_modules() -> set[str]:
    """Top-level names detectkit and its callbacks import (at any depth of the code)."""
    names = set()
    for top in ("detectkit", "callbacks"):
        for py in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(py.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


@functools.cache
def _distributions() -> dict[str, set[str]]:
    """Top-level module -> normalised names of the installed distributions providing it."""
    return {mod: {d.lower().replace("_", "-") for d in dists} for mod, dists in md.packages_distributions().items()}


def _import_names(dist: str) -> set[str]:
    """The top-level modules an installed distribution provides (this test runs in the full .venv)."""
    return {mod for mod, dists in _distributions().items() if dist in dists}


def test_every_declared_dependency_is_imported_or_explained(wheel):
    deps = declared(wheel)
    imported = _imported_modules()
    unused = []
    for dist in sorted(set().union(*(d for extra, d in deps.items() if extra not in ("dev", "all")))):
        if dist in NOT_IMPORTED:
            continue
        provides = _import_names(dist)
        assert provides, f"{dist} is declared but not installed in the test environment"
        if not provides & imported:
            unused.append(dist)
    assert unused == [], f"declared but never imported (remove them or explain them in NOT_IMPORTED): {unused}"
    for dist in ("requests", "albumentations", "pycocotools"):  # used by nothing / only tests and benchmarks
        assert dist not in deps[""]


def test_every_optional_package_names_its_extra(wheel):
    extras = {extra: dists for extra, dists in declared(wheel).items() if extra}
    for module, extra in EXTRA_OF_MODULE.items():
        dists = _distributions().get(module, set())
        if dists:  # installed here: the extra named must be the one that installs it
            assert dists & extras[extra], f"{module} is not installed by detectkit[{extra}]"
    for extra, dists in extras.items():
        if extra in ("dev", "all"):
            continue
        for dist in dists:
            assert _import_names(dist) & set(EXTRA_OF_MODULE), f"{dist} ({extra}): a missing import would not name its extra"
    message = missing_extra_message(ModuleNotFoundError("No module named 'optuna'", name="optuna"), "detectkit nas")
    assert message == "detectkit nas needs the package 'optuna', which is not installed: pip install 'detectkit[nas]'"
    lightning_style = ModuleNotFoundError("Requirement 'mlflow>=1.0.0' not met. HINT: Try running `pip install -U 'mlflow>=1.0.0'`")
    assert "pip install 'detectkit[tracking]'" in missing_extra_message(lightning_style, "detectkit fit")
    assert missing_extra_message(ModuleNotFoundError("No module named 'torch'", name="torch"), "x") is None
    try:  # torch.onnx's own error, raised from the ImportError
        try:
            raise ModuleNotFoundError("No module named 'onnx'", name="onnx")
        except ImportError as e:
            raise RuntimeError("Module onnx is not installed!") from e
    except RuntimeError as wrapped:
        assert "pip install 'detectkit[export]'" in missing_extra_message(wrapped, "detectkit export")


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    base = ROOT / "callbacks" if parts[:2] == ["detectkit", "callbacks"] else ROOT / "detectkit"
    rel = parts[2:] if parts[:2] == ["detectkit", "callbacks"] else parts[1:]
    for candidate in (base.joinpath(*rel, "__init__.py"), base.joinpath(*rel).with_suffix(".py") if rel else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _import_time_imports(name: str) -> set[str]:
    """Modules that importing ``name`` imports: its parents, and every import outside a function body."""
    path = _module_file(name)
    found = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    if path is None:
        return found
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    pending = list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}") is not None}
        else:
            pending.extend(ast.iter_child_nodes(node))
    return found


def test_fit_validate_predict_import_no_extra_at_import_time():
    """What a base install runs for fit/validate/predict (the CLI modules, the module, the data, the
    trainer defaults) must not import an extra's package when it is imported; the real proof, a base
    install that trains and predicts, is .ci/wheel-check."""
    from detectkit.cli.lightning import TRAINER_DEFAULTS

    roots = ["detectkit.cli", "detectkit.cli.lightning", "detectkit.cli.predict", "detectkit.cli.quickstart",
             "detectkit.modules.detector", "detectkit.modules.ema", "detectkit.data", "detectkit.predict",
             *(d.class_path.rpartition(".")[0] for d in TRAINER_DEFAULTS)]
    seen: set[str] = set()
    pending = list(roots)
    bad = []
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in _import_time_imports(name):
            if imported.split(".")[0] == "detectkit":
                pending.append(imported)
            elif imported.split(".")[0] in EXTRA_OF_MODULE:
                bad.append(f"{name} imports {imported}")
    assert len(seen) > 30 and bad == []


# --------------------------------------------------------------------------- README
def readme_commands() -> list[list[str]]:
    """The ``detectkit ...`` lines of the README's fenced blocks, as words (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^(\w+=\S+\s+)+", "", line.strip()).split(" #")[0]
            if line.startswith("detectkit "):
                commands.append(line.split())
    return commands


def _help(words: list[str]) -> str:
    """``detectkit WORDS --help`` in this process (one torch import for all the commands)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli_main([*words, "--help"])
    assert out.getvalue().strip(), f"detectkit {' '.join(words)} --help printed nothing"
    return out.getvalue()


def test_every_readme_command_and_option_exists():
    commands = readme_commands()
    assert len(commands) >= 10
    top = _help([])
    helps: dict[tuple[str, ...], str] = {}
    for words in commands:
        sub = words[1]
        assert f"  {sub} " in top, f"README names `detectkit {sub}`, which does not exist"
        key = (sub,)
        if sub in ("data", "nas") and len(words) > 2 and not words[2].startswith("-"):
            key = (sub, words[2])  # nested subcommand: its own options
        if key not in helps:
            helps[key] = _help(list(key))
        for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            parts = option.split(".")
            known = any(re.search(re.escape(".".join(parts[:n])) + r"(?![\w.-])", helps[key])
                        for n in range(len(parts), min(2, len(parts)) - 1, -1))
            assert known, f"README: `detectkit {' '.join(key)}` has no option {option}"
        for flag, value in zip(words, words[1:]):  # a shipped recipe (by name or experiments/ path) must exist
            if flag == "--config" and ("/" not in value or value.startswith("experiments/")):
                resolve(value)
