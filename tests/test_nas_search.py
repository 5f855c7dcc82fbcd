"""``detectkit nas``: workers share one study through the storage, a killed search resumes, and a
found architecture exports as a recipe that ``detectkit fit`` parses. Tiny space, 64 px, 2 steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from detectkit.models.yolo_nas.configs import YoloNASConfig

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp: Path, name: str, n_trials: int = 2) -> Path:
    cfg = {
        "study_name": name, "storage": f"sqlite:///{tmp}/studies.db", "n_trials": n_trials, "population_size": 2,
        "heartbeat": {"interval": 1, "grace_period": 3, "max_retry": 2},
        "space": {
            "seeds": [],
            "stem_channels": [8, 16],
            "stages": {"out_channels": [[16], [24], [32], [48]], "num_blocks": [1], "hidden_channels": [8],
                       "concat_intermediates": [False], "block": ["qarepvgg", "conv"]},
            "spp_channels": [32],
            "neck": {"out_channels": [[16], [16], [16], [32]], "num_blocks": [1], "hidden_channels": [8],
                     "concat_intermediates": [False], "block": ["conv"]},
            "head_channels": [[16], [16], [32]],
        },
        "proxy": {
            "recipe": str(ROOT / "experiments" / "quickstart.yaml"), "epochs": 2, "train_batches": 2, "val_batches": 1,
            "overrides": ["--data.image_size=64", "--data.synthetic.size=64", "--data.synthetic.train_images=8",
                          "--data.synthetic.val_images=4", "--data.loader.batch_size=4", "--data.loader.num_workers=0",
                          f"--data.cache_dir={tmp}/data", "--model.optim.warmup_steps=1"],
        },
        "latency": {"runs": 3, "warmup": 1},
        "remeasure": {"rounds": 2, "runs": 2},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def search(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, "-m", "detectkit.cli", "--debug", "nas", "search", "--config", str(config), *extra],
                            cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def study_of(tmp: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp}/studies.db")


def test_two_workers_share_one_study(tmp_path):
    """``--workers 2``: two worker processes of one study, then one re-measurement of all of them."""
    config = write_config(tmp_path, "shared", n_trials=2)
    proc = search(config, "--workers", "2")
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-4000:]
    study = study_of(tmp_path, "shared")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) >= 2
    assert len({t.user_attrs["worker"] for t in done}) == 2  # each process ran a trial of the one study
    for t in done:
        assert t.values[1] == t.user_attrs["latency_ms"] > 0 and 0 <= t.values[0] == t.user_attrs["map"] <= 1
        assert t.user_attrs["images"] == 2 * 2 * 4 and t.user_attrs["epochs"] == 2
        assert {"map_epoch_0", "map_epoch_1"} <= set(t.user_attrs)
    # after the workers: every complete trial timed again, in the parent, and the table uses it
    again = study.user_attrs["remeasured"]
    assert set(again) == {str(t.number) for t in done}
    assert all(v["rounds"] == 2 and v["runs"] == 2 and 0 < v["min_ms"] <= v["median_ms"] for v in again.values())
    assert "latency ms (median, re-measured)" in out and "re-measured (2 rounds x 2 runs, interleaved)" in out
    assert "no complete yolo_nas_s trial in this study" in out  # the verdict line (this tiny space has no seeds)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A search SIGKILLed in the middle of its first trial, then started again."""
    tmp = tmp_path_factory.mktemp("nas_kill")
    config = write_config(tmp, "killed", n_trials=2)
    proc = search(config)
    deadline = time.time() + 600
    running_since = None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            running = study_of(tmp, "killed").get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            continue
        if running and "latency_ms" in running[0].user_attrs:  # past the export: training now
            running_since = running_since or time.time()
            if time.time() - running_since > 1:
                break
    assert proc.poll() is None, proc.communicate()[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = study_of(tmp, "killed").get_trials(states=(TrialState.RUNNING,))
    assert len(killed) == 1 and not study_of(tmp, "killed").get_trials(states=(TrialState.COMPLETE,))
    time.sleep(4)  # past the heartbeat grace period
    again = search(config)
    out = again.communicate(timeout=900)[0]
    assert again.returncode == 0, out
    return tmp, killed[0], out


def test_killed_search_resumes(resumed):
    tmp, killed, out = resumed
    trials = study_of(tmp, "killed").trials
    states = {t.number: t.state for t in trials}
    assert states[killed.number] == TrialState.FAIL
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2  # the study's total, not two more
    assert any(t.params == killed.params for t in done)  # the killed candidate was retried
    assert "| trial |" in out and (tmp / "runs" / "nas" / "killed" / "pareto.png").stat().st_size > 0


def test_export_writes_a_recipe_that_fit_parses(resumed):
    tmp, _, _ = resumed
    from detectkit.nas.report import export_trial, show

    study = study_of(tmp, "killed")
    best = study.best_trials[0]
    summary = show("killed", f"sqlite:///{tmp}/studies.db", tmp / "show")
    assert (tmp / "show" / "pareto.png").stat().st_size > 0 and f"| {best.number} |" in summary["table"]
    paths = export_trial("killed", f"sqlite:///{tmp}/studies.db", best.number, tmp / "export")
    arch = YoloNASConfig.from_yaml(paths["arch"])
    assert arch.to_dict() == best.user_attrs["arch"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    res = subprocess.run([sys.executable, "-m", "detectkit.cli", "fit", "--config", paths["recipe"], "--print_config"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    printed = yaml.safe_load(res.stdout)
    assert printed["model"]["model"] == "yolo_nas_custom"
    assert YoloNASConfig.from_dict(printed["model"]["model_kwargs"]["arch"]) == arch
    data = printed["data"].get("init_args", printed["data"])
    assert data["image_size"] == 64  # the searched setting (the proxy's overrides) carries over
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp / "export")  # not the proxy's runs/quickstart
    with pytest.raises(ValueError, match="no trial 99"):
        export_trial("killed", f"sqlite:///{tmp}/studies.db", 99, tmp / "export")


def test_limits_reject_before_training_and_poor_candidates_stop_early(tmp_path):
    from detectkit.nas.search import REJECTED_PER_TRIAL, Objective, SearchConfig, run_search

    data = yaml.safe_load(write_config(tmp_path, "limits", n_trials=1).read_text())
    cfg = SearchConfig.from_dict({**data, "max_params": 1000})
    lines: list[str] = []
    study = run_search(cfg, log=lines.append)
    # rejections do not count as trials: the search goes on until REJECTED_PER_TRIAL x n_trials of them
    assert len(study.trials) == REJECTED_PER_TRIAL and "rejected by the limits" in lines[-1]
    for t in study.trials:
        assert t.state == TrialState.PRUNED and t.user_attrs["rejected"].startswith("params ")
        assert "latency_ms" not in t.user_attrs and "map" not in t.user_attrs  # nothing measured or trained

    # the median rule on intermediate mAP (Optuna's pruners refuse multi-objective studies)
    cfg = SearchConfig.from_dict({**data, "early_stop": {"ratio": 0.5, "min_trials": 2}})
    study = optuna.create_study(directions=["maximize", "minimize"])
    for v in (0.4, 0.6):
        study.add_trial(optuna.trial.create_trial(values=[v, 1.0], user_attrs={"map_epoch_0": v}))
    objective = Objective(cfg)
    good, poor = study.ask(), study.ask()
    objective._early_stop(good, 0, 0.3)  # 0.3 >= 0.5 x median 0.5: goes on
    with pytest.raises(optuna.TrialPruned, match="epoch 0"):
        objective._early_stop(poor, 0, 0.2)
    objective._early_stop(poor, 1, 0.0)  # the last epoch is scored, never stopped
    assert good.user_attrs["map_epoch_0"] == 0.3 and "stopped" in poor.user_attrs


def test_latency_limit_can_be_a_seeds_own_measured_latency(tmp_path):
    """``max_latency_ms: yolo_nas_s`` means "faster than yolo_nas_s on this machine": the limit is that
    seed's figure from this study; before it exists nothing is rejected; the seed itself never is."""
    from detectkit.nas.search import Objective, SearchConfig

    data = yaml.safe_load(write_config(tmp_path, "relative").read_text())
    data["space"]["seeds"] = ["yolo_nas_s"]
    with pytest.raises(ValueError, match="max_latency_ms must be a number of ms or one of the seeds"):
        SearchConfig.from_dict({**data, "max_latency_ms": "yolo_nas_xl"})
    objective = Objective(SearchConfig.from_dict({**data, "max_latency_ms": "yolo_nas_s"}))
    study = optuna.create_study(directions=["maximize", "minimize"])
    assert objective._latency_limit(study) == (None, "yolo_nas_s (not measured yet)")
    study.add_trial(optuna.trial.create_trial(values=[0.1, 8.5], user_attrs={"seed": "yolo_nas_s", "latency_ms": 8.5}))
    assert objective._latency_limit(study) == (8.5, "8.50 (yolo_nas_s)")
    assert Objective(SearchConfig.from_dict({**data, "max_latency_ms": 7}))._latency_limit(study) == (7, "7")


def test_a_measured_architecture_is_not_trained_again(resumed):
    """A candidate equal to a complete trial (a seed proposed again, a crossover duplicate) reuses its figures."""
    from detectkit.nas.search import SearchConfig, run_search

    tmp, _, _ = resumed
    cfg = SearchConfig.from_yaml(tmp / "killed.yaml")
    first = study_of(tmp, "killed").get_trials(states=(TrialState.COMPLETE,))[0]
    study_of(tmp, "killed").enqueue_trial(first.params)
    lines: list[str] = []
    study = run_search(cfg, n_trials=3, log=lines.append)
    dup = study.trials[-1]
    assert dup.state == TrialState.COMPLETE and dup.user_attrs["same_as"] == first.number
    assert dup.values == first.values and dup.user_attrs["map"] == first.user_attrs["map"]
    assert "seconds" not in dup.user_attrs and f"same architecture as trial {first.number}" in lines[-1]


def test_verdict_compares_found_architectures_with_yolo_nas_s():
    """The Done-when line: found (non-seed) architectures faster than yolo_nas_s with mAP no lower."""
    from detectkit.nas.report import format_table, pareto_front, verdict

    def row(n, seed, m, lat, state="complete", same=None):
        return {"trial": n, "state": state, "seed": seed, "map": m, "map_50": m, "latency_ms": lat,
                "latency_min_ms": lat - 1, "latency_source": "re-measured (3 rounds x 2 runs, interleaved)",
                "search_latency_ms": lat * 2, "params": 1e6, "macs": 1e8, "seconds": 5.0, "same_as": same,
                "pareto": False, "note": ""}

    rows = [row(0, "yolo_nas_s", 0.10, 20.0), row(1, "yolo_nas_m", 0.12, 40.0), row(2, "", 0.11, 30.0),
            row(3, "", 0.09, 10.0), row(4, "", 0.30, 5.0, state="pruned")]
    assert not verdict(rows)["holds"] and "no found architecture" in verdict(rows)["text"]
    rows.append(row(5, "", 0.10, 15.0))  # as accurate as yolo_nas_s, faster
    check = verdict(rows)
    assert check["holds"] and check["trials"] == [5] and "15.00 ms (min 14.00) vs 20.00 ms (min 19.00)" in check["text"]
    rows.append(row(6, "", 0.10, 15.0, same=5))  # a duplicate is not a second point of the front
    assert pareto_front(rows, ["map", "latency_ms"]) == {1, 2, 3, 5}  # 0 is dominated by 5, 4 was pruned
    table = format_table(rows)
    assert "| 0 | **yolo_nas_s** |" in table and "latency ms (median, re-measured)" in table
    assert verdict([row(0, "yolo_nas_m", 0.1, 9.0)])["holds"] is None
    late = {**row(7, "", 0.2, 3.0), "latency_source": "search", "latency_min_ms": None}  # finished after the re-measurement
    assert "trials [7]: search-time latency only" in format_table([*rows, late])
    # candidates rejected by a limit are one line under the table, not a row each
    rejected = [{**row(n, "", None, 1.0, state="pruned"), "latency_ms": None, "latency_min_ms": None,
                 "search_latency_ms": 9.0 + n / 10, "seconds": None,
                 "rejected": f"latency {9.0 + n / 10:.2f} ms > 8.00 (yolo_nas_s)"} for n in (8, 9, 10, 12)]
    table = format_table([*rows, *rejected])
    assert "| 8 |" not in table and "| 12 |" not in table
    assert "4 candidates rejected by the latency limit before training, their latency 9.80-10.20 ms: trials 8-10, 12" in table


def test_median_rule_waits_for_a_signal_above_noise() -> None:
    from detectkit.nas.search import stops_early

    assert stops_early(0.01, [0.1, 0.2, 0.3], ratio=0.5, min_trials=3)          # 0.01 < 0.5 x 0.2
    assert not stops_early(0.15, [0.1, 0.2, 0.3], ratio=0.5, min_trials=3)
    assert not stops_early(0.01, [0.1, 0.2], ratio=0.5, min_trials=3)           # too few complete trials
    assert not stops_early(0.01, [0.1, 0.2, 0.3], ratio=0.0)                    # rule off
    # early epochs: everyone is near zero; 0.000 vs a median of 0.002 is noise, not a poor candidate
    assert stops_early(0.0, [0.002, 0.002, 0.004], ratio=0.5, min_trials=3)
    assert not stops_early(0.0, [0.002, 0.002, 0.004], ratio=0.5, min_trials=3, min_median=0.02)
