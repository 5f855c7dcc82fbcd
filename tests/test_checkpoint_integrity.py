"""Checkpoints are verified on every read and written atomically: damaged files are named errors."""

from __future__ import annotations

import os
import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from compress_helpers import tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_checkpoint_load import tiny_data

import detectkit
from detectkit.checkpoint import CheckpointError, DiskFullError, read_checkpoint
from detectkit.checkpoint.lightning_io import AtomicCheckpointIO
from detectkit.modules import OptimConfig

ROOT = Path(__file__).resolve().parents[1]


def _module():
    from detectkit.modules.detector import DetectionModule

    return DetectionModule("tiny_ckpt_detector", num_classes=3, optim=OptimConfig(warmup_steps=1))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real 1-epoch checkpoint (64 px) of the registered tiny detector."""
    root = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    tiny_trainer(root, [ckpt], max_epochs=1, train_batches=1).fit(_module(), tiny_data(root / "data", 64))
    return root / "ckpt" / "last.ckpt"


def _flip(src: Path, dst: Path, start: int, n: int = 4096) -> Path:
    data = bytearray(src.read_bytes())
    data[start : start + n] = bytes(b ^ 0xFF for b in data[start : start + n])
    dst.write_bytes(bytes(data))
    return dst


def _largest_record_data(path: Path) -> tuple[int, int]:
    """(offset, size) of the biggest tensor's bytes inside the zip (flipping there keeps the zip valid)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


@pytest.fixture
def flipped(checkpoint, tmp_path) -> Path:
    """4 KB of inverted bytes in the middle of the file."""
    return _flip(checkpoint, tmp_path / "flipped.ckpt", checkpoint.stat().st_size // 2)


@pytest.fixture
def flipped_weights(checkpoint, tmp_path) -> Path:
    """Inverted bytes inside the largest tensor: the archive reads fine, only the content changed."""
    offset, size = _largest_record_data(checkpoint)
    return _flip(checkpoint, tmp_path / "flipped_weights.ckpt", offset + size // 4, min(4096, size // 2))


def _names_file_and_damage(message: str, path: Path) -> bool:
    return str(path) in message and bool(re.search(r"content hash mismatch|corrupt", message))


def test_flipped_bytes_are_caught_everywhere(flipped, flipped_weights, tmp_path):
    with pytest.raises(CheckpointError) as e:
        detectkit.load(flipped)
    assert _names_file_and_damage(str(e.value), flipped), e.value
    with pytest.raises(CheckpointError, match="content hash mismatch") as e:  # only the digest can tell
        detectkit.load(flipped_weights)
    assert str(flipped_weights) in str(e.value)
    flipped = flipped_weights  # below: files that Lightning's own reader would load silently

    # resume a fit with a plain Trainer (Lightning's own reader, then the module's hook verifies)
    trainer = tiny_trainer(tmp_path, [], max_epochs=2, train_batches=1)
    with pytest.raises(CheckpointError) as e:
        trainer.fit(_module(), tiny_data(tmp_path / "data", 64), ckpt_path=str(flipped))
    assert _names_file_and_damage(str(e.value), flipped), e.value

    # the same through AtomicCheckpointIO's reader
    trainer = tiny_trainer(tmp_path, [], max_epochs=2, train_batches=1)
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    with pytest.raises(CheckpointError) as e:
        trainer.validate(_module(), tiny_data(tmp_path / "data", 64), ckpt_path=str(flipped))
    assert _names_file_and_damage(str(e.value), flipped), e.value


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_flipped_bytes_through_the_cli(flipped, tmp_path, command, capsys):
    from detectkit.cli import main

    args = ["--config", str(ROOT / "experiments" / "quickstart.yaml"), "--model.model=tiny_ckpt_detector",
            "--data.image_size=64", "--data.loader.num_workers=0", f"--data.cache_dir={tmp_path / 'data'}",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false"]
    # the CLI prints a user error as one line on stderr and exits non-zero (a traceback only with --debug)
    assert main([command, *args, f"--ckpt_path={flipped}"]) != 0
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"detectkit {command}: error: ") and "\n" not in message, message
    assert _names_file_and_damage(message, flipped), message


def test_unreadable_files_get_one_clear_message(checkpoint, tmp_path):
    data = checkpoint.read_bytes()
    cases = {
        "truncated.ckpt": (data[: len(data) // 3], r"truncated checkpoint"),
        "empty.ckpt": (b"", r"empty file \(0 bytes\)"),
        "random.ckpt": (bytes(range(256)) * 40, r"not a torch checkpoint \(unrecognised binary data"),
        "notes.ckpt": (b"epoch: 3\nmap: 0.5\n", r"not a torch checkpoint \(a text file"),
    }
    for name, (content, pattern) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        for call in (read_checkpoint, detectkit.load):
            with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": " + pattern):
                call(path)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "missing.ckpt")) + ": no such file"):
        detectkit.load(tmp_path / "missing.ckpt")
    assert isinstance(CheckpointError("x"), ValueError)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full absent: no kernel ENOSPC to write into")
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "epoch": 1}, path)
    before = path.read_bytes()
    # the next save's temporary file lands on a device that is always full (a real ENOSPC)
    from detectkit.utils.files import partial_path

    partial_path(path).symlink_to("/dev/full")
    with pytest.raises(DiskFullError, match=f"no space left on device writing {re.escape(str(path))}") as e:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1 << 16)}, "epoch": 2}, path)
    assert e.value.errno == 28
    assert path.read_bytes() == before and io.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no .tmp left behind
