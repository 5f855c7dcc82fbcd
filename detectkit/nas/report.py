"""Reading a study back: the Pareto front (table + PNG) and a trial as architecture + fit recipe."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from detectkit.models.yolo_nas.configs import YoloNASConfig


def load_study(study_name: str, storage: str):
    import optuna

    from detectkit.nas.search import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(open_storage(storage))]
        raise ValueError(f"no study {study_name!r} in {storage}; studies there: {names or 'none'}") from None


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per finished trial (complete, pruned/rejected), front members flagged."""
    from optuna.trial import TrialState

    front = {t.number for t in study.best_trials}
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        a = t.user_attrs
        rows.append({
            "trial": t.number, "state": t.state.name.lower(), "seed": a.get("seed", ""),
            "map": a.get("map"), "map_50": a.get("map_50"), "latency_ms": a.get("latency_ms"),
            "params": a.get("params"), "macs": a.get("macs"), "images": a.get("images"),
            "epochs": a.get("epochs"), "seconds": a.get("seconds"), "pareto": t.number in front,
            "note": a.get("rejected") or a.get("stopped") or "",
        })
    return sorted(rows, key=lambda r: (not r["pareto"], -(r["map"] or -1)))


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (README-ready)."""

    def f(v: Any, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    out = ["| trial | seed | front | mAP | mAP50 | latency ms | params M | GMACs | state |",
           "|---:|---|:-:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['trial']} | {r['seed']} | {'*' if r['pareto'] else ''} | {f(r['map'], '.4f')} | "
                   f"{f(r['map_50'], '.4f')} | {f(r['latency_ms'], '.2f')} | "
                   f"{f(r['params'] and r['params'] / 1e6, '.2f')} | {f(r['macs'] and r['macs'] / 1e9, '.3f')} | "
                   f"{r['state']}{' (' + r['note'] + ')' if r['note'] else ''} |")
    return "\n".join(out)


def plot_front(rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Latency vs proxy mAP, the front joined, the YOLO-NAS seeds labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["map"] is not None and r["latency_ms"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([r["latency_ms"] for r in done if not r["pareto"]], [r["map"] for r in done if not r["pareto"]],
               c="lightgray", label="trial")
    front = sorted((r for r in done if r["pareto"]), key=lambda r: r["latency_ms"])
    ax.plot([r["latency_ms"] for r in front], [r["map"] for r in front], "o-", c="tab:blue", label="Pareto front")
    for r in done:
        if r["seed"]:
            ax.scatter([r["latency_ms"]], [r["map"]], marker="s", c="tab:red", zorder=3)
            ax.annotate(r["seed"], (r["latency_ms"], r["map"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("latency (ms, measured)")
    ax.set_ylabel("proxy mAP@[.5:.95]")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def show(study_name: str, storage: str, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write ``pareto.md``, ``pareto.json`` and ``pareto.png`` under ``out``; return the paths and table."""
    study = load_study(study_name, storage)
    rows = trial_rows(study)
    out = Path(out or f"runs/nas/{study_name}")
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    (out / "pareto.md").write_text(table + "\n")
    (out / "pareto.json").write_text(json.dumps(rows, indent=1))
    png = plot_front(rows, out / "pareto.png", title=study_name) if rows else None
    return {"table": table, "png": str(png) if png else None, "markdown": str(out / "pareto.md"), "rows": rows}


def export_trial(study_name: str, storage: str, trial: int, out: str | os.PathLike | None = None) -> dict[str, str]:
    """Write ``arch.yaml`` and ``fit.yaml`` (the proxy recipe with this architecture, full schedule)."""
    import yaml

    study = load_study(study_name, storage)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if trial not in trials:
        raise ValueError(f"study {study_name!r} has no trial {trial} (trials: 0..{max(trials, default=-1)})")
    t = trials[trial]
    if "arch" not in t.user_attrs:
        raise ValueError(f"trial {trial} of {study_name!r} has no architecture (state {t.state.name})")
    arch = YoloNASConfig.from_dict(t.user_attrs["arch"], source=f"{study_name} trial {trial}")
    out = Path(out or f"runs/nas/{study_name}/trial_{trial}")
    out.mkdir(parents=True, exist_ok=True)
    arch.to_yaml(out / "arch.yaml")
    record = study.user_attrs.get("detectkit_nas", {})
    proxy = record.get("proxy", {})
    recipe_path = Path(proxy.get("recipe", ""))
    if not recipe_path.is_file():
        raise ValueError(f"the study's proxy recipe {str(recipe_path)!r} is not here; run export where the search ran")
    recipe = yaml.safe_load(recipe_path.read_text()) or {}
    recipe.setdefault("model", {})
    recipe["model"]["model"] = "yolo_nas_custom"
    recipe["model"]["model_kwargs"] = {"arch": arch.to_dict()}  # inline: the recipe stands alone
    for arg in proxy.get("overrides", []):  # the searched setting (image size, data) carries over
        key, _, value = arg.lstrip("-").partition("=")
        node = recipe
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    header = (f"# yolo_nas_custom found by `detectkit nas` (study {study_name}, trial {trial}): proxy mAP "
              f"{t.user_attrs.get('map')}, latency {t.user_attrs.get('latency_ms')} ms, {t.user_attrs.get('params')} "
              f"params\n# detectkit fit --config {out / 'fit.yaml'}\n")
    (out / "fit.yaml").write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    return {"arch": str(out / "arch.yaml"), "recipe": str(out / "fit.yaml")}
