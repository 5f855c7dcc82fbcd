"""Track IDs across the frames of a video: detections in, the same detections with IDs out.

The association is the ``trackers`` package's (Roboflow, Apache-2.0; BoxMOT is AGPL): ByteTrack
by default, SORT and OC-SORT by name. This module only converts :class:`ImagePrediction` to and
from its ``supervision.Detections`` and keeps one tracker per video, so ``detectkit predict
--track``, ``detectkit track`` and the Python API share one implementation. Detections that the
tracker has not confirmed yet (ID -1) are dropped from the tracked output, as MOT files expect.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from detectkit.errors import UserError
from detectkit.predict.results import ImagePrediction

__all__ = ["TRACKERS", "Tracker"]

#: ``--tracker`` name -> the ``trackers`` class
TRACKERS: dict[str, str] = {"bytetrack": "ByteTrackTracker", "sort": "SORTTracker", "ocsort": "OCSORTTracker"}
#: the parameters that ``conf`` (the score a detection needs to start or confidently extend a track) sets
_CONF_PARAMS: dict[str, tuple[str, ...]] = {
    "bytetrack": ("track_activation_threshold", "high_conf_det_threshold"),
    "sort": ("track_activation_threshold",),
    "ocsort": ("high_conf_det_threshold",),
}


class Tracker:
    """One video's tracks. ``fps`` scales how long a lost track is kept; ``conf`` (default: the
    library's, 0.7 for ByteTrack) is the score a detection needs to start a track, to lower for a
    detector whose scores run low; ``params`` go to the ``trackers`` class (e.g. ``lost_track_buffer``)."""

    def __init__(self, name: str = "bytetrack", fps: float = 30.0, conf: float | None = None, **params: Any) -> None:
        if name not in TRACKERS:
            raise UserError(f"unknown tracker {name!r}: choose one of {', '.join(TRACKERS)}")
        import trackers  # the `track` extra; a missing one is named by the caller's missing-extra message

        if conf is not None:
            params = {**dict.fromkeys(_CONF_PARAMS[name], float(conf)), **params}
        self.name = name
        self._tracker = getattr(trackers, TRACKERS[name])(frame_rate=float(fps), **params)

    def update(self, pred: ImagePrediction) -> ImagePrediction:
        """The next frame's detections -> a copy with ``track_ids`` (confirmed tracks only; IDs count
        from 1, as in MOT files, where the library counts from 0)."""
        import supervision as sv

        detections = sv.Detections(xyxy=np.asarray(pred.boxes, np.float32).reshape(-1, 4),
                                   confidence=np.asarray(pred.scores, np.float32).reshape(-1),
                                   class_id=np.asarray(pred.labels, np.int64).reshape(-1))
        out = self._tracker.update(detections)
        ids = np.asarray(out.tracker_id if out.tracker_id is not None else [], np.int64).reshape(-1)
        keep = ids >= 0
        return dataclasses.replace(
            pred, boxes=np.asarray(out.xyxy, np.float32).reshape(-1, 4)[keep],
            scores=np.asarray(out.confidence, np.float32).reshape(-1)[keep],
            labels=np.asarray(out.class_id, np.int64).reshape(-1)[keep], track_ids=ids[keep] + 1)
