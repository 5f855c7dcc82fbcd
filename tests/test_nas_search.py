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
                          "--data.synthetic.val_images=4", "--data.batch_size=4", "--data.num_workers=0",
                          f"--data.cache_dir={tmp}/data", "--model.warmup_steps=1"],
        },
        "latency": {"runs": 3, "warmup": 1},
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
    config = write_config(tmp_path, "shared", n_trials=2)
    procs = [search(config, "--worker", str(i)) for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(o[-3000:] for o in outs)
    done = study_of(tmp_path, "shared").get_trials(states=(TrialState.COMPLETE,))
    assert len(done) >= 2
    assert len({t.user_attrs["worker"] for t in done}) == 2  # each process ran a trial of the one study
    for t in done:
        assert t.values[1] == t.user_attrs["latency_ms"] > 0 and 0 <= t.values[0] == t.user_attrs["map"] <= 1
        assert t.user_attrs["images"] == 2 * 2 * 4 and t.user_attrs["epochs"] == 2
        assert {"map_epoch_0", "map_epoch_1"} <= set(t.user_attrs)


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
    with pytest.raises(ValueError, match="no trial 99"):
        export_trial("killed", f"sqlite:///{tmp}/studies.db", 99, tmp / "export")


def test_limits_reject_before_training_and_poor_candidates_stop_early(tmp_path):
    from detectkit.nas.search import Objective, SearchConfig, run_search

    data = yaml.safe_load(write_config(tmp_path, "limits", n_trials=1).read_text())
    cfg = SearchConfig.from_dict({**data, "max_params": 1000})
    study = run_search(cfg, log=lambda *_: None)
    (t,) = study.trials
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
