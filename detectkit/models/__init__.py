"""Model families; importing them registers their builders."""

from detectkit.models import yolo_nas, yolo_world  # noqa: F401
