"""Videos, streams and tracking: the one frame reader (stride, a stream that drops ends with one
line and what was read), ByteTrack IDs through ``detectkit predict --track`` (annotated video,
MOT txt and JSON), on generated clips with known tracks."""

from __future__ import annotations

import http.server
import json
import logging
import socketserver
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_predict_paths import trained  # noqa: F401  the one-epoch checkpoint fixture
from timeout_helpers import time_limit

from detectkit.cli import main
from detectkit.data.synthetic import moving_shapes
from detectkit.predict import ImagePrediction
from detectkit.predict.sources import SourceOptions, is_live, iter_source
from detectkit.predict.writers import VideoWriter, mot_lines

pytest.importorskip("trackers")  # the track extra


def _clip(path: Path, frames: int = 24, objects: int = 2, seed: int = 0) -> list[tuple]:
    truth = []
    with VideoWriter(path, 25) as writer:
        for image, boxes, labels, ids in moving_shapes(frames, objects, size=96, seed=seed):
            writer.write(image)
            truth.append((boxes, labels, ids))
    return truth


def _frames_in(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    return n


def test_video_frames_come_through_the_reader_with_a_stride(tmp_path):
    clip = tmp_path / "clip.mp4"
    _clip(clip, frames=10)
    frames = list(iter_source(clip, SourceOptions(vid_stride=3)))
    assert [f.source for f in frames] == [f"{clip}#{i}" for i in (0, 3, 6, 9)]
    assert frames[0].fps == pytest.approx(25 / 3) and frames[0].image.shape == (96, 96, 3)
    assert is_live("0") and is_live("rtsp://cam/1") and not is_live(str(clip))
    with pytest.raises(ValueError, match="vid_stride"):
        SourceOptions(vid_stride=0)


def test_bytetrack_keeps_one_id_per_moving_object():
    """The real tracker on the generator's true boxes: each object keeps the one ID it was given."""
    from detectkit.predict.track import Tracker

    tracker = Tracker("bytetrack", fps=25)
    seen: dict[int, set[int]] = {}
    for i, (image, boxes, labels, ids) in enumerate(moving_shapes(40, objects=2, size=160, seed=1)):
        pred = ImagePrediction(image=image, boxes=boxes, scores=np.full(len(boxes), 0.9, np.float32), labels=labels,
                               class_names=["a", "b", "c"], index=i)
        out = tracker.update(pred)
        for box, tid in zip(out.boxes, out.track_ids):
            truth = int(ids[np.argmin(np.abs(boxes - box).sum(1))])
            seen.setdefault(truth, set()).add(int(tid))
    assert sorted(seen) == [1, 2] and all(len(v) == 1 for v in seen.values())
    assert seen[1] != seen[2]


def test_cli_track_writes_annotated_video_and_tracks(trained, tmp_path, capsys):  # noqa: F811
    ckpt, _, _ = trained
    clip = tmp_path / "walk.mp4"
    _clip(clip, frames=12)
    out = tmp_path / "out"
    assert main(["track", "--source", str(clip), "--checkpoint", str(ckpt), "--save-dir", str(out),
                 "--conf", "0.01", "--track-conf", "0.01"]) == 0
    printed = capsys.readouterr().out
    assert "tracks: " in printed
    assert _frames_in(out / "walk.mp4") == 12
    lines = (out / "tracks" / "walk.txt").read_text().splitlines()
    rows = json.loads((out / "tracks" / "walk.json").read_text())
    assert lines and len(lines) == len(rows)
    for line, row in zip(lines, rows):
        fields = line.split(",")
        assert len(fields) == 10 and fields[7:] == ["-1", "-1", "-1"]
        assert int(fields[0]) == row["frame"] and 1 <= row["frame"] <= 12 and int(fields[1]) == row["track_id"] >= 1
        assert [float(v) for v in fields[2:6]] == pytest.approx(row["bbox"], abs=0.01)
    # the same detections as predict without tracking, frame by frame (tracking adds IDs, not boxes)
    plain = tmp_path / "plain"
    assert main(["predict", "--source", str(clip), "--checkpoint", str(ckpt), "--save-dir", str(plain),
                 "--conf", "0.01", "--no-images"]) == 0
    boxes = {(r["image_id"] + 1, *np.round(r["bbox"], 1)) for r in json.loads((plain / "predictions.json").read_text())}
    assert {(r["frame"], *np.round(r["bbox"], 1)) for r in rows} <= boxes


def test_track_without_the_extra_is_one_line(trained, tmp_path, monkeypatch, capsys):  # noqa: F811
    ckpt, _, _ = trained
    monkeypatch.setitem(sys.modules, "trackers", None)  # as if not installed
    assert main(["predict", "--track", "--source", str(tmp_path / "any.mp4"), "--checkpoint", str(ckpt)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["detectkit predict: error: detectkit predict needs the package 'trackers', which is not installed: "
                   "pip install 'detectkit[track]'"]


def test_ctrl_c_keeps_what_was_predicted(trained, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Ctrl-C is how a webcam run ends: the video, tracks and JSON so far are written, exit 0."""
    import detectkit.predict as predict_module

    ckpt, _, _ = trained
    clip = tmp_path / "cam.mp4"
    _clip(clip, frames=10)
    real = predict_module.predict

    def interrupted_after_4(*args, **kwargs):
        for i, pred in enumerate(real(*args, **kwargs)):
            if i == 4:
                raise KeyboardInterrupt
            yield pred

    monkeypatch.setattr(predict_module, "predict", interrupted_after_4)
    out = tmp_path / "out"
    assert main(["track", "--source", str(clip), "--checkpoint", str(ckpt), "--save-dir", str(out)]) == 0
    assert "interrupted after 4 images" in capsys.readouterr().err
    assert len(json.loads((out / "images.json").read_text())) == 4 and _frames_in(out / "cam.mp4") == 4
    assert (out / "tracks" / "cam.txt").is_file() and (out / "predictions.json").is_file()


def test_mot_lines_are_the_challenge_format():
    assert mot_lines(3, [[10, 20, 40, 60]], [7], [0.5]) == ["3,7,10.00,20.00,30.00,40.00,0.5000,-1,-1,-1"]


class _MJPEG(http.server.BaseHTTPRequestHandler):
    """An MJPEG camera that sends ``frames`` frames, then goes away (server closed: reconnects fail)."""

    frames = 8

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        try:
            for i in range(self.frames):
                ok, jpg = cv2.imencode(".jpg", np.full((48, 64, 3), 20 * i, np.uint8))
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                                 + jpg.tobytes() + b"\r\n")
                self.wfile.flush()
                time.sleep(0.01)
        except OSError:  # a client that only looked at the headers
            return
        server = self.server
        threading.Thread(target=lambda: (server.shutdown(), server.server_close()), daemon=True).start()

    def log_message(self, *args: object) -> None:
        pass


def test_stream_that_drops_ends_with_one_line_and_the_frames_read(trained, tmp_path, caplog):  # noqa: F811
    ckpt, _, _ = trained
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _MJPEG)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cam.mjpg"
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="detectkit.predict"), time_limit(30, "predict on a dropped stream"):
        assert main(["predict", "--source", url, "--checkpoint", str(ckpt), "--save-dir", str(out),
                     "--stream-retries", "2", "--stream-timeout", "2"]) == 0
    lost = [r.getMessage() for r in caplog.records if "reconnect" in r.getMessage()]
    assert len(lost) == 1 and lost[0].startswith(url) and "2 reconnect attempts failed" in lost[0]
    written = json.loads((out / "images.json").read_text())
    assert len(written) == _MJPEG.frames and _frames_in(out / "cam.mp4") == len(written)
