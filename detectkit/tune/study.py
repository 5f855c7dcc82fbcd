"""The study of ``detectkit tune``: one trial = one real short ``detectkit fit`` of the recipe.

Each trial samples the space (Optuna's TPE), turns the values into recipe overrides
(``--model.optim.lr=0.003``) and fits the recipe through the same LightningCLI app as ``detectkit
fit`` (:class:`detectkit.nas.objectives.ShortFit`, shared with the architecture search's proxy
training), validated every epoch, with the recipe's epochs (``--trainer.max_epochs`` to shorten).
After each validation the mAP goes to Optuna (``trial.report``) and Optuna's MedianPruner decides
whether the trial stops there (PRUNED). The trial's value is the last epoch's val mAP.

Several processes (machines, SLURM array tasks) share one study through its RDB storage (sqlite by
default, PostgreSQL/MySQL for a cluster), opened by :func:`detectkit.nas.search.open_storage`
(heartbeats: a killed worker's trial is marked FAILED and its parameters retried). ``n_trials`` is
the study's total: complete, pruned, running and failed-in-training trials of all workers. A trial
whose fit fails (a diverging lr stopped by NanGuard, out of memory at a large image size) is FAILED
with ``user_attrs["error"]`` and the search goes on; a bad recipe or override (a UserError) stops
it. A trial started while the total is already taken by lower-numbered trials (two workers asking
at once) ends at once as FAILED with ``user_attrs["surplus"]`` and is not shown or counted. A
killed worker's trial (FAILED by the heartbeat check, no ``error``) does not count: it is retried.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from detectkit.errors import UserError
from detectkit.tune.config import PARAMETERS, Range, TuneConfig, recipe_values

warnings.filterwarnings(
    "ignore", message=r"(RetryHeartbeatStaleTrialCallback|optuna\.storages\._heartbeat\.fail_stale_trials) is experimental"
)
warnings.filterwarnings("ignore", message=r"Argument ``(heartbeat_interval|grace_period|constant_liar)`` is an experimental")

RECORD_KEY = "detectkit_tune"


# --------------------------------------------------------------------------- the recipe
def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def set_key(recipe: dict[str, Any], dotted: str, value: Any) -> None:
    """``recipe[a][b][c] = value`` for ``a.b.c``; a section in subclass form (``class_path`` +
    ``init_args``) takes its arguments under ``init_args``."""
    node = recipe
    *parents, leaf = dotted.split(".")
    for p in parents:
        if p not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    if leaf not in node and isinstance(node.get("init_args"), dict):
        node = node["init_args"]
    node[leaf] = value


def get_key(recipe: Mapping[str, Any], dotted: str) -> Any:
    node: Any = recipe
    for p in dotted.split("."):
        if isinstance(node, Mapping) and p not in node and isinstance(node.get("init_args"), Mapping):
            node = node["init_args"]
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def override_items(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["--data.image_size=64", ...]`` -> ``[("data.image_size", 64), ...]``."""
    import yaml

    out = []
    for arg in overrides:
        key, _, value = arg.lstrip("-").partition("=")
        try:
            out.append((key, yaml.safe_load(value)))
        except yaml.YAMLError:
            out.append((key, value))
    return out


def load_recipe(configs: Sequence[str | os.PathLike], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The recipe files merged in order (later ones win), with the command line's overrides applied."""
    import yaml

    recipe: dict[str, Any] = {}
    for c in configs:
        data = yaml.safe_load(Path(c).read_text(encoding="utf-8")) or {}
        if not isinstance(data, Mapping):
            raise UserError(f"{c}: a recipe is a mapping at the top level")
        _merge(recipe, data)
    for key, value in override_items(overrides):
        set_key(recipe, key, value)
    return recipe


def trial_overrides(params: Mapping[str, Any]) -> list[str]:
    """A trial's sampled values as LightningCLI arguments."""
    return [f"--{key}={json.dumps(value)}" for key, value in recipe_values(params).items()]


# --------------------------------------------------------------------------- storage and study
def redact(url: str) -> str:
    """A storage URL without its password (error messages, logs)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def open_tune_storage(url: str, heartbeat: Mapping[str, Any] | None = None):
    """:func:`detectkit.nas.search.open_storage`, with a one-line error when it cannot be reached."""
    from detectkit.nas.search import open_storage

    try:
        return open_storage(url, heartbeat)
    except ModuleNotFoundError as e:
        raise UserError(f"cannot open the study storage {redact(url)}: its database driver {e.name!r} is not "
                        f"installed (pip install psycopg2-binary for PostgreSQL, pymysql for MySQL)") from None
    except Exception as e:  # unreachable host, bad credentials, a path that cannot be created, a bad URL
        text = " ".join(str(getattr(e, "orig", None) or e).split())
        if len(text) > 300:
            text = text[:300] + " ..."
        raise UserError(f"cannot open the study storage {redact(url)}: {type(e).__name__}: {text}") from None


def open_study(cfg: TuneConfig, space: Mapping[str, Range], worker: int = 0):
    """Create or join the study (single objective: maximise val mAP)."""
    import optuna

    storage = open_tune_storage(cfg.storage, cfg.heartbeat)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed + 1000 * worker, constant_liar=True)
    try:
        study = optuna.create_study(study_name=cfg.study_name, storage=storage, direction="maximize",
                                    sampler=sampler, pruner=cfg.pruner.make(), load_if_exists=True)
    except Exception as e:
        raise UserError(f"cannot open study {cfg.study_name!r} in {redact(cfg.storage)}: {' '.join(str(e).split())}") from None
    if len(study.directions) != 1 or study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UserError(f"study {cfg.study_name!r} in {redact(cfg.storage)} is not a tune study (it has other "
                        "objectives); use another --study-name")
    record = cfg.record(space)
    saved = study.user_attrs.get(RECORD_KEY)
    if saved is None:
        study.set_user_attr(RECORD_KEY, record)
    elif saved.get("space") != json.loads(json.dumps(record["space"])):
        raise UserError(f"study {cfg.study_name!r} in {redact(cfg.storage)} was created with another search space "
                        f"({saved.get('space')}); use a new --study-name")
    return study


def counted(study, below: int | None = None) -> int:
    """Trials that count towards ``n_trials``: complete, pruned, running and failed in training
    (``below``: numbered lower)."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states)
               if "surplus" not in t.user_attrs and (t.state != TrialState.FAIL or "error" in t.user_attrs)
               and (below is None or t.number < below))


class Surplus(Exception):
    """This trial was started after ``n_trials`` were already taken (a race between workers)."""


class TrialFailed(Exception):
    """This trial's fit failed (it counts, as FAILED; the search goes on)."""


def should_stop(trial, epoch: int, value: float, last_epoch: int) -> bool:
    """Report ``value`` (the val mAP after ``epoch``) and ask the study's pruner whether this trial
    stops here. The last epoch is scored, never pruned."""
    trial.report(value, epoch)
    return epoch < last_epoch and trial.should_prune()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def params_text(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


class Objective:
    """One trial: sample, fit briefly through the recipe, report each epoch's mAP, return the last."""

    def __init__(self, cfg: TuneConfig, space: Mapping[str, Range], configs: Sequence[str], overrides: Sequence[str],
                 log: Callable[[str], None] = print) -> None:
        self.cfg, self.space, self.configs, self.overrides, self.log = cfg, dict(space), list(configs), list(overrides), log

    def __call__(self, trial) -> float:
        import optuna

        from detectkit.nas.objectives import ShortFit, run_proxy, short_fit_args

        if counted(trial.study, below=trial.number) >= self.cfg.n_trials:
            trial.set_user_attr("surplus", True)
            raise Surplus()
        start = time.time()
        params = {name: rng.suggest(trial, name, PARAMETERS[name].kind) for name, rng in self.space.items()}
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        extra = trial_overrides(params)
        cfg = self.cfg

        def args(root: str) -> list[str]:
            return short_fit_args(self.configs, [*self.overrides, *extra], root, None, cfg.train_batches, cfg.val_batches)

        try:
            run = ShortFit(args, what=f"recipe {' + '.join(self.configs)} with {' '.join([*self.overrides, *extra])}")
        except Exception as e:  # the recipe or an override does not parse: the search stops (not counted)
            trial.set_user_attr("setup_error", f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
            raise
        # a trial reports one line: no end-of-run report (table, run folder) from each fit
        run.trainer.callbacks[:] = [cb for cb in run.trainer.callbacks if type(cb).__name__ != "RunReport"]
        last = int(run.trainer.max_epochs or 1) - 1
        epochs: list[float] = []

        def report(epoch: int, value: float) -> None:
            epochs.append(value)
            if should_stop(trial, epoch, value, last):
                trial.set_user_attr("pruned_at_epoch", epoch)
                raise optuna.TrialPruned(f"map {value:.4f} after epoch {epoch}")

        head = f"trial {trial.number} ({counted(trial.study)}/{cfg.n_trials} started): {params_text(params)}"
        try:
            result = run_proxy(run, report)
        except optuna.TrialPruned:
            self.log(f"{head} -> pruned after epoch {len(epochs) - 1}, map {epochs[-1]:.4f} "
                     f"({time.time() - start:.0f} s)")
            raise
        except UserError:
            raise  # the recipe or an override: every trial would fail the same way
        except Exception as e:
            error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            trial.set_user_attr("error", error)
            self.log(f"{head} -> failed: {error} ({time.time() - start:.0f} s)")
            raise TrialFailed(error) from e
        finally:
            run.close()
        if not epochs:
            raise UserError("the trial's fit ran no validation, so there is no val mAP to tune on (a recipe or "
                            "override with trainer.limit_val_batches 0?)")
        value = float(epochs[-1])
        trial.set_user_attr("map_50", result["map_50"])
        trial.set_user_attr("seconds", round(time.time() - start, 1))
        self.log(f"{head} -> map {value:.4f} ({time.time() - start:.0f} s)")
        return value


def run_tune(cfg: TuneConfig, configs: Sequence[str], overrides: Sequence[str] = (), worker: int = 0,
             log: Callable[[str], None] = print):
    """Run (or join, or resume) the study until ``cfg.n_trials`` trials are taken or ``timeout`` passes."""
    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import: before ours below)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)  # one line per trial, not Lightning's banner each time
    recipe = load_recipe(configs, overrides)
    size = get_key(recipe, "data.image_size")
    space = cfg.resolved_space(size if isinstance(size, int) and not isinstance(size, bool) else None)
    study = open_study(cfg, space, worker)
    optuna.storages.fail_stale_trials(study)  # a killed worker's trial: FAILED, its parameters retried
    done = counted(study)
    if done >= cfg.n_trials:
        log(f"study {cfg.study_name!r}: {cfg.n_trials} trials already taken")
        return study
    log(f"study {cfg.study_name!r} in {redact(cfg.storage)}: {done}/{cfg.n_trials} trials taken; searching "
        + ", ".join(f"{k} {v}" for k, v in space.items()))

    def stop_at_total(study, trial) -> None:
        if counted(study) >= cfg.n_trials:
            study.stop()

    study.optimize(Objective(cfg, space, configs, overrides, log), n_trials=None, timeout=cfg.timeout,
                   callbacks=[stop_at_total], catch=(Surplus, TrialFailed), gc_after_trial=True)
    return study


# --------------------------------------------------------------------------- results
def trial_rows(study) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        if "surplus" in t.user_attrs or t.state == TrialState.WAITING:
            continue
        steps = t.intermediate_values
        value = t.value if t.state == TrialState.COMPLETE else (steps[max(steps)] if steps else None)
        state = t.state.name.lower()
        if t.state == TrialState.PRUNED and steps:
            state = f"pruned (epoch {max(steps)})"
        elif t.state == TrialState.FAIL:
            why = t.user_attrs.get("error") or t.user_attrs.get("setup_error")
            state = f"failed ({why[:80]})" if why else "failed (worker lost: retried)"
        rows.append({"trial": t.number, "params": dict(t.params), "map": value, "state": state})
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| trial | params | mAP | state |", "|---:|---|---:|---|"]
    for r in rows:
        value = "" if r["map"] is None else f"{r['map']:.4f}"
        lines.append(f"| {r['trial']} | {params_text(r['params'])} | {value} | {r['state']} |")
    return "\n".join(lines)


def write_best_recipe(study, cfg: TuneConfig, configs: Sequence[str], overrides: Sequence[str],
                      out: str | os.PathLike | None = None) -> Path | None:
    """The base recipe with the command line's overrides and the best trial's values merged, as
    ``<out>/best.yaml`` (``detectkit fit --config`` takes it); None while no trial is complete."""
    import yaml
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    out = Path(out or cfg.output_dir or f"runs/tune/{cfg.study_name}")
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(configs, overrides)
    for key, value in recipe_values(best.params).items():
        set_key(recipe, key, value)
    # the fit's logs and checkpoints go beside the recipe, not into the base recipe's folder
    logger = (recipe.get("trainer") or {}).get("logger")
    if isinstance(logger, Mapping) and isinstance(logger.get("init_args"), dict) and "save_dir" in logger["init_args"]:
        logger["init_args"]["save_dir"] = str(out)
    header = (f"# best trial of `detectkit tune` study {cfg.study_name} (trial {best.number}): val mAP {best.value:.4f}\n"
              f"# {params_text(best.params)}\n"
              f"# base: {' + '.join(str(c) for c in configs)}{' ' + ' '.join(overrides) if overrides else ''}\n"
              f"# detectkit fit --config {out / 'best.yaml'}\n")
    path = out / "best.yaml"
    tmp = out / f".best.yaml.{os.getpid()}.tmp"  # workers may finish together: each writes whole files
    tmp.write_text(header + yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
    return path
