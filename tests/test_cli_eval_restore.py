"""``detectkit validate --ckpt_path last`` of a fit with EMA: no restore warnings (before: Lightning's
"WeightAveraging state cannot be restored" and ModelCheckpoint's "dirpath has changed"), and in a
log (non-terminal stdout) plain progress lines."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from compress_helpers import TinyDetector

from detectkit.cli import main
from detectkit.registry import list_models, register_model

ROOT = Path(__file__).resolve().parents[1]
RESTORE_WARNINGS = re.compile(r"WeightAveraging|cannot be restored|dirpath has changed|callbacks used to create")


def _args(tmp: Path) -> list[str]:
    if "tiny_cli_detector" not in list_models():
        register_model(lambda num_classes=3, checkpoint=None: TinyDetector(num_classes), name="tiny_cli_detector")
    return ["--config", str(ROOT / "experiments" / "quickstart.yaml"), "--model.model=tiny_cli_detector",
            "--data.image_size=64", "--data.loader.batch_size=2", "--data.loader.num_workers=0",
            "--data.synthetic.train_images=4", "--data.synthetic.val_images=2", "--data.synthetic.size=64",
            f"--data.cache_dir={tmp / 'data'}", f"--trainer.default_root_dir={tmp}", "--trainer.enable_model_summary=false"]


def test_validate_an_ema_run_restores_without_warnings_and_prints_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe's logger writes runs/quickstart/ here
    assert main(["fit", *_args(tmp_path), "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1"]) == 0
    assert sorted(tmp_path.rglob("ModelEMA*")) == [] and sorted(tmp_path.rglob("last.ckpt"))
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["validate", *_args(tmp_path), "--ckpt_path", "last"]) == 0
    out, err = capsys.readouterr()
    said = [str(w.message) for w in caught] + err.splitlines()
    assert not [s for s in said if RESTORE_WARNINGS.search(s)], said
    lines = [line for line in out.splitlines() if line.startswith("validate")]
    assert lines[0] == "validate: 1 batches" and re.match(r"^validate: 1 batches in \d+s: map [0-9.]+ ", lines[-1]), out
