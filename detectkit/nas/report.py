"""Reading a study back: the Pareto front (table + PNG) and a trial as architecture + fit recipe."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
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


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(rows: list[dict[str, Any]], objectives: list[str]) -> set[int]:
    """Trial numbers of the non-dominated complete rows.

    Computed here rather than taken from ``study.best_trials``: the front is drawn with the
    re-measured latency, which the study's stored objective values (search-time) do not hold.
    """
    from detectkit.nas.search import OBJECTIVES

    sign = [-1.0 if OBJECTIVES[o] == "maximize" else 1.0 for o in objectives]
    points = {r["trial"]: tuple(s * float(r[o]) for s, o in zip(sign, objectives)) for r in rows
              if r["state"] == "complete" and r["same_as"] is None and all(r.get(o) is not None for o in objectives)}
    return {n for n, p in points.items() if not any(_dominates(q, p) for m, q in points.items() if m != n)}


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per finished trial (complete, pruned/rejected), front members flagged.

    ``latency_ms`` is the re-measured median where the study holds one (``search_latency_ms`` the
    figure the trial saw during the search); ``latency_source`` says which.
    """
    from optuna.trial import TrialState

    remeasured = study.user_attrs.get("remeasured") or {}
    objectives = (study.user_attrs.get("detectkit_nas") or {}).get("objectives", ["map", "latency_ms"])
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        a = t.user_attrs
        same = a.get("same_as")
        again = remeasured.get(str(same if same is not None else t.number))
        rows.append({
            "trial": t.number, "state": t.state.name.lower(), "seed": a.get("seed", ""),
            "map": a.get("map"), "map_50": a.get("map_50"),
            "latency_ms": again["median_ms"] if again else a.get("latency_ms"),
            "latency_min_ms": again["min_ms"] if again else None,
            "latency_source": (f"re-measured ({again['rounds']} rounds x {again['runs']} runs, interleaved)" if again
                               else "search" if a.get("latency_ms") is not None else ""),
            "search_latency_ms": a.get("latency_ms"),
            "params": a.get("params"), "macs": a.get("macs"), "images": a.get("images"),
            "epochs": a.get("epochs"), "seconds": a.get("seconds"), "same_as": same, "pareto": False,
            "rejected": a.get("rejected"),
            "note": a.get("rejected") or a.get("stopped") or (f"same architecture as trial {same}" if same is not None else ""),
        })
    front = pareto_front(rows, objectives)
    for r in rows:
        r["pareto"] = r["trial"] in front
    return sorted(rows, key=lambda r: (not r["pareto"], -(r["map"] or -1), r["trial"]))


def verdict(rows: list[dict[str, Any]], reference: str = "yolo_nas_s") -> dict[str, Any]:
    """The issue's claim, checked: a found (non-seed) architecture with lower latency than
    ``reference`` and proxy mAP no lower, both from this study (same proxy budget, same timing)."""
    ref = next((r for r in rows if r["seed"] == reference and r["state"] == "complete" and r["same_as"] is None), None)
    if ref is None or ref["latency_ms"] is None:
        return {"holds": None, "text": f"no complete {reference} trial in this study: nothing to compare against"}
    found = [r for r in rows if not r["seed"] and r["state"] == "complete" and r["map"] is not None
             and r["latency_ms"] is not None and r["latency_ms"] < ref["latency_ms"] and r["map"] >= ref["map"]]
    source = ref["latency_source"] or "search"
    if not found:
        return {"holds": False, "reference": ref["trial"], "trials": [],
                "text": f"no found architecture is faster than {reference} (trial {ref['trial']}: "
                        f"{ref['latency_ms']:.2f} ms, {source}) with proxy mAP >= {ref['map']:.4f}"}
    best = min(found, key=lambda r: r["latency_ms"])
    return {"holds": True, "reference": ref["trial"], "trials": sorted(r["trial"] for r in found),
            "text": f"{len(found)} found architecture(s) faster than {reference} with proxy mAP >= its "
                    f"{ref['map']:.4f}: trials {sorted(r['trial'] for r in found)}; fastest trial {best['trial']}: "
                    f"{best['latency_ms']:.2f} ms{_spread(best)} vs {ref['latency_ms']:.2f} ms{_spread(ref)} ({source}), "
                    f"mAP {best['map']:.4f}"}


def _spread(row: dict[str, Any]) -> str:
    return f" (min {row['latency_min_ms']:.2f})" if row.get("latency_min_ms") is not None else ""


def _ranges(numbers: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (README-ready). Seeds are marked in the seed column, the front with ``*``.
    Candidates rejected by a limit before training are summarised in one line below the table
    (each is still a row of ``pareto.json``): a tight latency limit can reject a hundred."""

    def f(v: Any, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    rejected = [r for r in rows if r.get("rejected")]
    rows = [r for r in rows if not r.get("rejected")]

    again = next((r["latency_source"] for r in rows if r["latency_source"].startswith("re-measured")), None)
    head = "latency ms (median, re-measured)" if again else "latency ms (search)"
    out = [f"| trial | seed | front | mAP | mAP50 | {head} | min ms | search ms | params M | GMACs | s | state |",
           "|---:|---|:-:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['trial']} | {'**' + r['seed'] + '**' if r['seed'] else ''} | {'*' if r['pareto'] else ''} | "
                   f"{f(r['map'], '.4f')} | {f(r['map_50'], '.4f')} | {f(r['latency_ms'], '.2f')} | "
                   f"{f(r['latency_min_ms'], '.2f')} | {f(r['search_latency_ms'], '.2f')} | "
                   f"{f(r['params'] and r['params'] / 1e6, '.2f')} | {f(r['macs'] and r['macs'] / 1e9, '.3f')} | "
                   f"{f(r['seconds'], '.0f')} | {r['state']}{' (' + r['note'] + ')' if r['note'] else ''} |")
    if rejected:
        lat = [r["search_latency_ms"] for r in rejected if r["search_latency_ms"] is not None]
        spread = f", their latency {min(lat):.2f}-{max(lat):.2f} ms" if lat else ""
        kinds = sorted({r["rejected"].split(" ")[0] for r in rejected})
        out.append(f"\n{len(rejected)} candidates rejected by the {'/'.join(kinds)} limit before training{spread}: "
                   f"trials {_ranges([r['trial'] for r in rejected])} (reasons in pareto.json)")
    if again:
        out.append(f"\nlatency: {again}; search ms: the trial's own figure while the search ran (other workers loading the machine)")
        stale = [r["trial"] for r in rows if r["latency_source"] == "search" and r["state"] == "complete"]
        if stale:
            out.append(f"trials {stale}: search-time latency only (finished after the re-measurement; "
                       "`detectkit nas show STUDY --remeasure` times them with the others)")
    return "\n".join(out)


def plot_front(rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Latency vs proxy mAP, the front joined, the YOLO-NAS seeds labelled (re-measured latency
    where there is one; the search-time figure as a faint x joined to it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["map"] is not None and r["latency_ms"] is not None and r["same_as"] is None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    again = [r for r in done if r["latency_source"].startswith("re-measured")]
    for i, r in enumerate(again):
        ax.plot([r["search_latency_ms"], r["latency_ms"]], [r["map"], r["map"]], c="0.85", lw=0.8, zorder=1)
        ax.scatter([r["search_latency_ms"]], [r["map"]], marker="x", c="0.7", s=14, zorder=1,
                   label="search-time latency" if i == 0 else None)
    ax.scatter([r["latency_ms"] for r in done if not r["pareto"]], [r["map"] for r in done if not r["pareto"]],
               c="gray", label="trial", zorder=2)
    front = sorted((r for r in done if r["pareto"]), key=lambda r: r["latency_ms"])
    ax.plot([r["latency_ms"] for r in front], [r["map"] for r in front], "o-", c="tab:blue", label="Pareto front", zorder=3)
    for r in done:
        if r["seed"]:
            ax.scatter([r["latency_ms"]], [r["map"]], marker="s", c="tab:red", zorder=4)
            ax.annotate(r["seed"], (r["latency_ms"], r["map"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"latency (ms, {again[0]['latency_source'] if again else 'measured during the search'})", fontsize=8)
    ax.set_ylabel("proxy mAP@[.5:.95]")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def show(study_name: str, storage: str, out: str | os.PathLike | None = None, remeasure: dict[str, int] | None = None,
         log=print) -> dict[str, Any]:
    """Write ``pareto.md``, ``pareto.json`` and ``pareto.png`` under ``out``; return the paths, table and
    verdict. ``remeasure={"rounds": R, "runs": N}`` times the complete trials again first
    (:func:`detectkit.nas.search.remeasure_study`)."""
    study = load_study(study_name, storage)
    if remeasure and remeasure.get("rounds"):
        from detectkit.nas.search import remeasure_study

        remeasure_study(study, int(remeasure["rounds"]), int(remeasure.get("runs") or 5), log=log)
    rows = trial_rows(study)
    out = Path(out or f"runs/nas/{study_name}")
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    check = verdict(rows)
    (out / "pareto.md").write_text(table + "\n\n" + check["text"] + "\n")
    (out / "pareto.json").write_text(json.dumps({"rows": rows, "verdict": check}, indent=1))
    png = plot_front(rows, out / "pareto.png", title=study_name) if rows else None
    return {"table": table, "png": str(png) if png else None, "markdown": str(out / "pareto.md"), "rows": rows,
            "verdict": check}


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
    # the run's logs and checkpoints go beside the architecture, not into the proxy recipe's folder
    logger = recipe.get("trainer", {}).get("logger")
    if isinstance(logger, Mapping) and isinstance(logger.get("init_args"), Mapping) and "save_dir" in logger["init_args"]:
        logger["init_args"]["save_dir"] = str(out)
    header = (f"# yolo_nas_custom found by `detectkit nas` (study {study_name}, trial {trial}): proxy mAP "
              f"{t.user_attrs.get('map')}, latency {t.user_attrs.get('latency_ms')} ms, {t.user_attrs.get('params')} "
              f"params\n# detectkit fit --config {out / 'fit.yaml'}\n")
    (out / "fit.yaml").write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    return {"arch": str(out / "arch.yaml"), "recipe": str(out / "fit.yaml")}
