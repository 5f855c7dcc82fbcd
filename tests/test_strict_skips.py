"""CI's strict skips (issue 25): a skip for absent ../shared data or a missing module of the ``all``
extras fails the run under DETECTKIT_STRICT_SKIPS=1; other skips stay skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from strict_skips import _all_extras, required

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

def test_needs_shared():
    pytest.skip("shared test data absent: /nowhere/shared")

def test_needs_a_gpu():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.skipif(True, reason="shared test data absent: /nowhere/fixtures")
def test_marked():
    pass

def test_passes():
    pass
'''
MODULE_SKIP = 'import pytest\npytest.skip("shared test data absent: /nowhere", allow_module_level=True)\n'


def _run(tmp_path: Path, strict: bool) -> str:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "DETECTKIT_STRICT_SKIPS": "1" if strict else "0"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "strict_skips", "-p", "no:cacheprovider",
                          "-p", "no:xdist", "--continue-on-collection-errors", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=120)
    return run.stdout


def test_strict_mode_fails_shared_and_extras_skips_only(tmp_path):
    out = _run(tmp_path, strict=True)
    assert "FAILED test_sample.py::test_needs_shared" in out and "ERROR test_sample.py::test_marked" in out, out  # a skipif mark skips at setup
    assert "ERROR test_module_skip.py" in out, out  # a module skipped at collection
    assert "SKIPPED [1] test_sample.py" in out and "needs a CUDA GPU" in out, out
    assert "PASSED test_sample.py::test_passes" in out and "DETECTKIT_STRICT_SKIPS=1" in out, out


def test_without_the_variable_skips_stay_skips(tmp_path):
    out = _run(tmp_path, strict=False)
    assert "FAILED" not in out and "ERROR" not in out and "4 skipped" in out, out


def test_missing_modules_of_the_all_extras_are_required():
    extras = _all_extras()
    for module in ("mlflow", "modelopt", "torch_pruning", "multipart", "onnxruntime", "trackers", "xdist"):
        assert required(f"could not import '{module}': No module named '{module}'", extras), module
    for module in ("tensorrt", "open_clip", "pycuda"):
        assert not required(f"could not import '{module}': No module named '{module}'", extras), module
    assert not required("/dev/full absent: no kernel ENOSPC to write into", extras)


def test_missing_shared_data_is_required_only_beside_a_shared_folder(tmp_path):
    reason = "shared test data absent: ../shared/fixtures/x"
    assert required(reason, set(), shared=tmp_path)  # ../shared is there but incomplete: a failure
    assert not required(reason, set(), shared=tmp_path / "absent")  # no ../shared at all: the skip stands
