"""``python -m detectkit.cli.quickstart`` end to end on tiny settings: one JSON line with metrics and paths.

The full quickstart (map_50 >= 0.5 in minutes) is run by ``make quickstart``; here the same code
path runs two training steps.
"""

from __future__ import annotations

import json
from pathlib import Path

from detectkit.cli.quickstart import DEFAULT_CONFIG, main


def test_quickstart_prints_one_json_line(tmp_path, capsys):
    overrides = [
        "--data.image_size=64", "--data.loader.batch_size=2", "--data.loader.num_workers=0",
        "--data.synthetic.train_images=4", "--data.synthetic.val_images=2", "--data.synthetic.size=64",
        "--trainer.max_steps=2", "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
    ]
    assert DEFAULT_CONFIG.is_file()
    assert main(["--output-dir", str(tmp_path / "run"), *overrides]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large"):
        assert 0.0 <= summary[key] <= 1.0 or summary[key] == -1.0
    assert Path(summary["checkpoint"]).is_file()
    assert Path(summary["logs"]).is_dir() and (Path(summary["logs"]) / "metrics.csv").is_file()
    assert str(tmp_path) in summary["checkpoint"] and summary["steps"] == 2
    assert any((tmp_path / "run" / "data").iterdir())  # the generated dataset lives in the run dir
