"""The Optuna study: multi-objective search (NSGA-II or TPE) seeded with YOLO-NAS S/M/L.

Order of work per candidate, cheapest first: build it and count parameters/MACs (reject over the
limits before anything else), export and time it (reject over the latency limit), then the proxy
training, validated every epoch.

Early stopping: Optuna's pruners (``trial.report``/``should_prune``) do not support
multi-objective studies, so the search applies its own median rule to the intermediate mAP, which
every trial stores as user attributes ``map_epoch_<e>``: after epoch ``e`` (not the last), a
candidate whose mAP is below ``early_stop.ratio`` x the median mAP at epoch ``e`` of the finished
trials (once ``early_stop.min_trials`` have finished, and only when that median is at least
``early_stop.min_median``: below it every candidate's mAP is noise, and 0.000 against a median of
0.002 would stop candidates for nothing) is stopped and marked PRUNED. Rejected
candidates (limits) are PRUNED as well, with the reason in ``user_attrs["rejected"]``; they cost a
build (and a latency measurement) only, so they do not count towards ``n_trials`` (a search stops
after ``REJECTED_PER_TRIAL`` x ``n_trials`` of them). The seeds are never rejected: they are the
reference points of the front. ``max_latency_ms`` may name a seed (``yolo_nas_s``): the limit is
then that seed's latency as this study measured it, on this machine.

Resumable and distributed: the study lives in an RDB storage (sqlite file by default; a
PostgreSQL/MySQL URL for a cluster) with heartbeats: a worker killed mid-trial leaves a RUNNING
trial whose heartbeat stops; after ``heartbeat.grace_period`` seconds the next worker to start a
trial marks it FAILED and re-enqueues its parameters (``RetryHeartbeatStaleTrialCallback``). ``n_trials`` is
the study's total: finished (complete or stopped early) plus running trials of all workers; a restarted
search runs only what remains.

A candidate whose architecture a complete trial already measured (a seed found again by the
sampler, a duplicate of NSGA-II's crossover, a seed re-enqueued into a resumed study) reuses that
trial's figures instead of training again (``user_attrs["same_as"]``).

Latency seen by a trial is taken while other workers (or users) load the machine, so the search
ends with :func:`remeasure_study`: every complete trial's model is timed again, back to back and
interleaved, in one process once no trial is running; the Pareto table and plot use those figures.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from detectkit.errors import UserError
from detectkit.nas.objectives import LatencyConfig, ProxyConfig
from detectkit.nas.space import SearchSpace
from detectkit.recipes import resolve as resolve_recipe

# Heartbeats and stale-trial retry are what make a killed search resume; Optuna marks both
# experimental and would warn once per worker and per call.
warnings.filterwarnings(
    "ignore", message=r"(RetryHeartbeatStaleTrialCallback|optuna\.storages\._heartbeat\.fail_stale_trials) is experimental"
)

#: objective name -> Optuna direction
OBJECTIVES = {"map": "maximize", "map_50": "maximize", "latency_ms": "minimize", "params": "minimize", "macs": "minimize"}
DEFAULT_STORAGE = "sqlite:///runs/nas/studies.db"
#: what a trial with an already measured architecture copies from the trial that measured it
REUSED = ("num_classes", "params", "macs", "latency_ms", "latency", "map", "map_50", "epochs", "images", "image_size")


@dataclass
class SearchConfig:
    """``detectkit nas search --config X.yaml``: see experiments/nas_quickstart.yaml."""

    study_name: str = "nas"
    storage: str = DEFAULT_STORAGE
    sampler: str = "nsga2"
    population_size: int = 8
    seed: int = 0
    n_trials: int | None = 12
    timeout: float | None = None
    objectives: list[str] = field(default_factory=lambda: ["map", "latency_ms"])
    #: a number, or a seed's name ("yolo_nas_s"): that seed's own latency, measured in this study
    max_latency_ms: float | str | None = None
    max_params: int | None = None
    max_macs: int | None = None
    early_stop: dict[str, Any] = field(default_factory=lambda: {"ratio": 0.5, "min_trials": 3})
    heartbeat: dict[str, Any] = field(default_factory=lambda: {"interval": 10, "grace_period": 60, "max_retry": 2})
    space: SearchSpace = field(default_factory=lambda: SearchSpace.from_dict({}))
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    #: the final re-measurement (rounds x runs per model, interleaved); rounds: 0 skips it
    remeasure: dict[str, int] = field(default_factory=lambda: {"rounds": 10, "runs": 5})
    output_dir: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> SearchConfig:
        data = dict(data)
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; allowed: {sorted(known)}")
        try:
            data["space"] = SearchSpace.from_dict(data.get("space"), source=f"{source}: space")
            data["proxy"] = ProxyConfig(**(data.get("proxy") or {}))
            data["latency"] = LatencyConfig(**(data.get("latency") or {}))
            cfg = cls(**data)
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from None
        bad = [o for o in cfg.objectives if o not in OBJECTIVES]
        if bad or not cfg.objectives:
            raise ValueError(f"{source}: objectives must be a non-empty list of {sorted(OBJECTIVES)}, got {cfg.objectives}")
        if cfg.n_trials is None and cfg.timeout is None:
            raise ValueError(f"{source}: set n_trials or timeout (or both)")
        if cfg.sampler not in ("nsga2", "tpe"):
            raise ValueError(f"{source}: sampler must be 'nsga2' or 'tpe', got {cfg.sampler!r}")
        bad = sorted(set(cfg.remeasure) - {"rounds", "runs"})
        if bad or any(not isinstance(v, int) or v < 0 for v in cfg.remeasure.values()):
            raise ValueError(f"{source}: remeasure takes rounds and runs (integers >= 0), got {cfg.remeasure}")
        limit = cfg.max_latency_ms
        if isinstance(limit, str) and limit not in cfg.space.seeds:
            raise ValueError(f"{source}: max_latency_ms must be a number of ms or one of the seeds "
                             f"{sorted(cfg.space.seeds)}, got {limit!r}")
        try:  # a shipped recipe's name or a file; recorded as the file the trials train with
            cfg.proxy.recipe = str(resolve_recipe(cfg.proxy.recipe).resolve())
        except UserError as e:
            raise ValueError(f"{source}: proxy.recipe {e}") from None
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> SearchConfig:
        import yaml

        try:  # a file, or a shipped recipe's name (nas_quickstart)
            p = resolve_recipe(path)
        except UserError as e:
            raise ValueError(f"search config {e}") from None
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"{p}: expected a mapping at the top level")
        return cls.from_dict(data, source=str(p))

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/nas/{self.study_name}")

    def record(self) -> dict[str, Any]:
        """What the study keeps about itself (``nas show``/``nas export`` read it back)."""
        return {"objectives": self.objectives, "space": self.space.to_dict(), "proxy": self.proxy.to_dict(),
                "latency": asdict(self.latency), "limits": {"max_latency_ms": self.max_latency_ms,
                                                            "max_params": self.max_params, "max_macs": self.max_macs}}


def open_storage(url: str, heartbeat: Mapping[str, Any] | None = None):
    """An Optuna RDB storage (a sqlite file's folder is created); heartbeats make killed trials retry."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    hb = dict(heartbeat or {})
    kw: dict[str, Any] = {}
    if hb.get("interval"):
        kw = {"heartbeat_interval": int(hb["interval"]), "grace_period": int(hb.get("grace_period") or 6 * hb["interval"]),
              "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=hb.get("max_retry", 2))}
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    # Workers started together on a new database race to create Optuna's schema: the loser gets
    # an IntegrityError/OperationalError from alembic's version table. The winner's schema is
    # then there, so opening again succeeds.
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kw)
        except (IntegrityError, OperationalError):
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def make_sampler(cfg: SearchConfig, worker: int = 0):
    import optuna

    seed = cfg.seed + 1000 * worker  # distinct streams per worker, reproducible per worker index
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=cfg.population_size)


def open_study(cfg: SearchConfig, worker: int = 0, create: bool = True):
    """Create or join the study; enqueue the seeds once (``skip_if_exists``)."""
    import optuna

    storage = open_storage(cfg.storage, cfg.heartbeat)
    directions = [OBJECTIVES[o] for o in cfg.objectives]
    study = optuna.create_study(study_name=cfg.study_name, storage=storage, directions=directions,
                                sampler=make_sampler(cfg, worker), load_if_exists=True)
    saved = study.user_attrs.get("detectkit_nas")
    if saved is None:
        study.set_user_attr("detectkit_nas", cfg.record())
    elif saved.get("objectives") != cfg.objectives or saved.get("space") != cfg.space.to_dict():
        raise ValueError(f"study {cfg.study_name!r} in {cfg.storage} was created with other objectives or another "
                         "space; use a new study_name")
    for name, arch in cfg.space.seeds.items():
        study.enqueue_trial(cfg.space.params_of(arch), user_attrs={"seed": name}, skip_if_exists=True)
    return study


#: a search whose candidates keep failing the limits ends after this many rejections per counted trial
REJECTED_PER_TRIAL = 5


def _rejected(study) -> int:
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if "rejected" in t.user_attrs)


def _counted(study) -> int:
    from optuna.trial import TrialState

    # a candidate rejected by a limit before training costs a latency measurement, not a trial
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
               if "rejected" not in t.user_attrs)


class Objective:
    """One candidate: limits, latency, proxy training (see the module docstring)."""

    def __init__(self, cfg: SearchConfig, log=print) -> None:
        self.cfg = cfg
        self.log = log

    def _early_stop(self, trial, epoch: int, value: float) -> None:
        import optuna
        from optuna.trial import TrialState

        trial.set_user_attr(f"map_epoch_{epoch}", value)
        if epoch + 1 >= self.cfg.proxy.epochs:
            return
        done = [t.user_attrs.get(f"map_epoch_{epoch}") for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        done = [v for v in done if v is not None]
        rule = self.cfg.early_stop
        ratio = float(rule.get("ratio", 0))
        if stops_early(value, done, ratio, int(rule.get("min_trials", 3)), float(rule.get("min_median", 0.0))):
            trial.set_user_attr("stopped", f"map {value:.4f} at epoch {epoch} < {ratio} x median {statistics.median(done):.4f}")
            raise optuna.TrialPruned(trial.user_attrs["stopped"])

    def _latency_limit(self, study) -> tuple[float | None, str]:
        """``max_latency_ms`` in ms (a seed's name: that seed's search-time latency, once measured)."""
        limit = self.cfg.max_latency_ms
        if not isinstance(limit, str):
            return limit, f"{limit}"
        from optuna.trial import TrialState

        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)):
            if t.user_attrs.get("seed") == limit and "latency_ms" in t.user_attrs:
                ms = float(t.user_attrs["latency_ms"])
                return ms, f"{ms:.2f} ({limit})"
        return None, f"{limit} (not measured yet)"

    @staticmethod
    def _measured(trial):
        """A complete trial of the study with exactly this architecture (its own figures), if any."""
        from optuna.trial import TrialState

        return next((t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if t.params == trial.params and "same_as" not in t.user_attrs), None)

    def __call__(self, trial) -> tuple[float, ...]:
        import optuna

        from detectkit.nas.objectives import (
            count_macs,
            count_params,
            measure_latency,
            prepare_proxy,
            run_proxy,
        )

        cfg = self.cfg
        start = time.time()
        arch = cfg.space.suggest(trial)
        trial.set_user_attr("arch", arch.to_dict())
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        seed = cfg.space.seed_name(trial.params)
        if seed:
            trial.set_user_attr("seed", seed)
        same = self._measured(trial)
        if same is not None:
            for k, v in same.user_attrs.items():
                if k in REUSED or k.startswith("map_epoch_"):
                    trial.set_user_attr(k, v)
            trial.set_user_attr("same_as", same.number)
            self.log(f"trial {trial.number}{' (' + seed + ')' if seed else ''}: same architecture as trial "
                     f"{same.number}, its figures reused")
            return tuple(same.values)
        run = prepare_proxy(arch, cfg.proxy, workdir=None)
        try:
            model, size = run.module.model, run.image_size
            trial.set_user_attr("num_classes", int(model.num_classes))
            params, macs = count_params(model), count_macs(model, size)
            trial.set_user_attr("params", params)
            trial.set_user_attr("macs", macs)
            # the seeds are the reference points of the front: limits do not apply to them
            for limit, value, name in ((cfg.max_params, params, "params"), (cfg.max_macs, macs, "macs")):
                if not seed and limit is not None and value > limit:
                    trial.set_user_attr("rejected", f"{name} {value} > {limit}")
                    raise optuna.TrialPruned(trial.user_attrs["rejected"])
            lat_size = cfg.latency.image_size or size
            latency = measure_latency(model, lat_size, cfg.latency)
            trial.set_user_attr("latency_ms", latency)
            trial.set_user_attr("latency", {**asdict(cfg.latency), "image_size": lat_size})
            limit, text = self._latency_limit(trial.study) if not seed else (None, "")
            if limit is not None and latency > limit:
                trial.set_user_attr("rejected", f"latency {latency:.2f} ms > {text}")
                self.log(f"trial {trial.number}: rejected before training, {trial.user_attrs['rejected']}")
                raise optuna.TrialPruned(trial.user_attrs["rejected"])
            result = run_proxy(run, lambda e, v: self._early_stop(trial, e, v))
        finally:
            run.close()
        for k in ("map", "map_50", "epochs", "images", "image_size"):
            trial.set_user_attr(k, result[k])
        trial.set_user_attr("seconds", round(time.time() - start, 1))
        values = {"map": result["map"], "map_50": result["map_50"], "latency_ms": latency, "params": params, "macs": macs}
        self.log(f"trial {trial.number}{' (' + seed + ')' if seed else ''}: map {result['map']:.4f} "
                 f"latency {latency:.2f} ms params {params / 1e6:.2f}M ({time.time() - start:.0f} s)")
        return tuple(float(values[o]) for o in cfg.objectives)


def stops_early(value: float, done: list[float], ratio: float = 0.0, min_trials: int = 3,
                min_median: float = 0.0) -> bool:
    """The median rule: ``value`` (a candidate's mAP after an epoch) against the mAPs of the complete
    trials after the same epoch."""
    if ratio <= 0 or len(done) < min_trials:
        return False
    median = statistics.median(done)
    return median >= min_median and value < ratio * median


def run_search(cfg: SearchConfig, worker: int = 0, n_trials: int | None = None, log=print):
    """Run (or resume, or join) the study until it holds ``n_trials`` finished trials or ``timeout`` passes."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(cfg, worker)
    total = n_trials if n_trials is not None else cfg.n_trials
    optuna.storages.fail_stale_trials(study)  # trials of killed workers: FAILED and re-enqueued
    if total is not None and _counted(study) >= total:
        log(f"study {cfg.study_name!r}: {total} trials already done")
        return study

    def stop_at_total(study, trial) -> None:
        if total is None:
            return
        if _counted(study) >= total:
            study.stop()
        elif (rejected := _rejected(study)) >= REJECTED_PER_TRIAL * total:
            log(f"study {cfg.study_name!r}: {rejected} candidates rejected by the limits; stopping "
                f"(loosen max_latency_ms / max_params / max_macs or narrow the space)")
            study.stop()

    study.optimize(Objective(cfg, log), n_trials=None, timeout=cfg.timeout, callbacks=[stop_at_total],
                   gc_after_trial=True)
    return study


def running_trials(study) -> list[int]:
    from optuna.trial import TrialState

    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]


def remeasure_study(study, rounds: int = 10, runs: int = 5, log=print) -> dict[str, dict[str, Any]]:
    """Time every complete trial's model again, interleaved in this process (see
    :func:`detectkit.nas.objectives.remeasure_latency`), and keep the figures in the study
    (``study.user_attrs["remeasured"]``, trial number -> median/min/rounds/runs/host) for
    ``nas show``. Refuses while trials run: their load is what this step removes."""
    from optuna.trial import TrialState

    from detectkit.models.yolo_nas.configs import YoloNASConfig
    from detectkit.nas.objectives import build, prepare_proxy, remeasure_latency

    busy = running_trials(study)
    if busy:
        raise ValueError(f"study {study.study_name!r}: trials {busy} are still running; re-measure once every worker "
                         f"has finished (detectkit nas show {study.study_name} --remeasure)")
    record = study.user_attrs.get("detectkit_nas") or {}
    lat = LatencyConfig(**record.get("latency", {}))
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if "arch" in t.user_attrs and "same_as" not in t.user_attrs and "latency_ms" in t.user_attrs]
    if not trials:
        return {}
    num_classes = next((t.user_attrs["num_classes"] for t in trials if "num_classes" in t.user_attrs), None)
    if num_classes is None:  # a study from before trials recorded it: the proxy recipe's data says
        probe = prepare_proxy(YoloNASConfig.from_dict(trials[0].user_attrs["arch"]), ProxyConfig(**record["proxy"]))
        num_classes = int(probe.module.model.num_classes)
        probe.close()
    models = {}
    for t in trials:
        model = build(YoloNASConfig.from_dict(t.user_attrs["arch"], source=f"trial {t.number}"),
                      int(t.user_attrs.get("num_classes", num_classes))).eval()
        size = int((t.user_attrs.get("latency") or {}).get("image_size") or lat.image_size or t.user_attrs["image_size"])
        models[t.number] = (model, size)
    log(f"re-measuring the latency of {len(models)} trials, interleaved: {rounds} rounds x {runs} runs each")
    figures = remeasure_latency(models, lat, rounds=rounds, runs=runs)
    host = socket.gethostname()
    result = {str(k): {**v, "host": host} for k, v in figures.items()}
    study.set_user_attr("remeasured", result)
    return result
