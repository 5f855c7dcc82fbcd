"""``detectkit tune``: two workers share one study and the best trial's recipe trains with ``detectkit
fit``; the MedianPruner stops a poor trial; bad input is one line. Real fits of the quickstart recipe
on 8 generated 64 px images, 2 epochs of 2 batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def tiny(tmp: Path) -> list[str]:
    return ["--data.image_size=64", "--data.synthetic.train_images=8", "--data.synthetic.val_images=4",
            "--data.synthetic.size=64", "--data.loader.batch_size=4", "--data.loader.num_workers=0",
            f"--data.cache_dir={tmp / 'data'}", "--model.optim.warmup_steps=1", "--trainer.max_epochs=2"]


def tune(tmp: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "detectkit.cli", "tune", "--config", "quickstart",
                             "--storage", f"sqlite:///{tmp}/studies.db", *extra, *tiny(tmp)],
                            cwd=tmp, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_workers_share_one_study_and_the_best_recipe_fits(tmp_path):
    space = ["--no-default-space", "--space", "lr=1e-4:1e-2:log", "--space", "scale=0.1:0.3"]
    common = ["--study-name", "shared", "--n-trials", "4", *space, "--out", str(tmp_path / "best")]
    procs = [tune(tmp_path, *common, "--worker", str(i)) for i in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path}/studies.db")
    taken = [t for t in study.trials if "surplus" not in t.user_attrs]
    assert len(taken) == 4 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in taken)
    assert len({t.user_attrs["worker"] for t in taken}) == 2  # both processes ran trials of the one study
    assert all(set(t.params) == {"lr", "scale"} and set(t.intermediate_values) <= {0, 1} for t in taken)
    log = "\n".join(outs)
    assert sum(line.startswith("trial ") and " -> " in line for line in log.splitlines()) == 4  # a line per trial
    assert "| trial | params | mAP | state |" in log and "train it: detectkit fit --config" in log

    best_yaml = tmp_path / "best" / "best.yaml"
    recipe = yaml.safe_load(best_yaml.read_text())
    best = study.best_trial
    assert recipe["model"]["optim"]["lr"] == pytest.approx(best.params["lr"])
    s = best.params["scale"]
    assert recipe["data"]["augment"]["scale"] == pytest.approx([1 - s, 1 + s])
    assert recipe["data"]["image_size"] == 64 and recipe["trainer"]["max_epochs"] == 2  # overrides carry over
    assert recipe["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path / "best")
    fit = subprocess.run([sys.executable, "-m", "detectkit.cli", "fit", "--config", str(best_yaml),
                          "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
                          "--trainer.enable_progress_bar=false"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    from detectkit.checkpoint import read_checkpoint

    (last,) = (tmp_path / "best").rglob("last.ckpt")
    assert read_checkpoint(last)["hyper_parameters"]["optim"]["lr"] == pytest.approx(best.params["lr"])


def test_median_pruner_stops_a_trial_below_the_median(tmp_path, monkeypatch):
    """Three complete trials scored 0.5 at every epoch: a real trial (random init, 2 batches) scores
    far below after its first epoch and is pruned there, before its second."""
    from detectkit.tune.config import TuneConfig
    from detectkit.tune.study import format_table, open_study, run_tune, should_stop, trial_rows

    monkeypatch.chdir(tmp_path)
    cfg = TuneConfig.from_dict({"study_name": "prune", "storage": f"sqlite:///{tmp_path}/studies.db", "n_trials": 4,
                                "default_space": False, "space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}},
                                "pruner": {"startup_trials": 3, "warmup_epochs": 0}})
    study = open_study(cfg, cfg.resolved_space(None))
    for lr in (1e-3, 2e-3, 3e-3):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr}, distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)}, value=0.5,
            intermediate_values={0: 0.5, 1: 0.5}))
    lines: list[str] = []
    configs = [str(ROOT / "experiments" / "quickstart.yaml")]
    study = run_tune(cfg, configs, tiny(tmp_path), log=lines.append)
    (trial,) = [t for t in study.trials if t.number == 3]
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]
    assert trial.intermediate_values[0] < 0.5 and trial.user_attrs["pruned_at_epoch"] == 0
    assert "pruned after epoch 0" in lines[-1]
    assert "| 3 | lr=" in format_table(trial_rows(study)) and "pruned (epoch 0)" in format_table(trial_rows(study))

    # the decision itself: below the median prunes, the last epoch is scored and never pruned
    probe = study.ask()
    assert should_stop(probe, 0, 0.1, last_epoch=1)
    assert not should_stop(probe, 1, 0.1, last_epoch=1)
    good = study.ask()
    assert not should_stop(good, 0, 0.6, last_epoch=1)


@pytest.mark.parametrize("args, message", [
    (["--space", "lrr=1e-4:1e-2"], "detectkit tune: error: --space: unknown parameter 'lrr'. Did you mean 'lr'?"),
    (["--tune", "tune.yaml"], "tune.yaml: space: unknown parameter 'wight_decay'. Did you mean 'weight_decay'?"),
    (["--storage", "postgresql://user:secret@127.0.0.1:1/db"],
     "detectkit tune: error: cannot open the study storage postgresql://user:***@127.0.0.1:1/db"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "tune.yaml").write_text("tune:\n  space:\n    wight_decay: {low: 1.0e-6, high: 1.0e-3}\n")
    res = subprocess.run([sys.executable, "-m", "detectkit.cli", "tune", "--config", "quickstart", *args],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert message in res.stderr and "secret" not in res.stderr




def test_a_failed_fit_is_a_failed_trial_and_the_search_goes_on(tmp_path, monkeypatch):
    """Every trial's fit raises after its first epoch: each is FAILED with its error, counts towards
    n_trials, and the search ends (no endless retry) without a best recipe."""
    from detectkit.tune.config import TuneConfig
    from detectkit.tune.study import format_table, run_tune, trial_rows, write_best_recipe

    (tmp_path / "boom_callback.py").write_text(
        "import lightning as L\n\n\nclass Boom(L.Callback):\n"
        "    def on_train_epoch_end(self, trainer, pl_module):\n        raise RuntimeError('loss diverged')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cfg = TuneConfig.from_dict({"study_name": "boom", "storage": f"sqlite:///{tmp_path}/studies.db", "n_trials": 2,
                                "default_space": False, "space": {"warmup_steps": [0, 1]}})
    lines: list[str] = []
    overrides = [*tiny(tmp_path), "--trainer.callbacks+=boom_callback.Boom"]
    study = run_tune(cfg, [str(ROOT / "experiments" / "quickstart.yaml")], overrides, log=lines.append)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all("loss diverged" in t.user_attrs["error"] for t in study.trials)
    assert sum("-> failed: RuntimeError: loss diverged" in line for line in lines) == 2
    assert "failed (RuntimeError: loss diverged)" in format_table(trial_rows(study))
    assert write_best_recipe(study, cfg, [], []) is None


def test_readme_tune_yaml_is_a_valid_config(tmp_path):
    import re

    from detectkit.tune.config import TuneConfig

    section = (ROOT / "README.md").read_text().split("## Tune hyperparameters", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    (tmp_path / "tune.yaml").write_text(block)
    cfg = TuneConfig.from_yaml(tmp_path / "tune.yaml")
    space = cfg.resolved_space(128)
    assert "scale" not in space and space["image_size"].choices == (96, 128) and space["lr"].log
    assert cfg.n_trials == 24 and cfg.pruner.warmup_epochs == 1 and cfg.train_batches == 16
