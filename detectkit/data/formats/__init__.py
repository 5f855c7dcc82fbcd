"""Readers for each annotation format; :func:`open_dataset` picks one from a path."""

from detectkit.data.formats.detect import FORMATS, DatasetSource, canonical_split, load_dataset, open_dataset

__all__ = ["FORMATS", "DatasetSource", "canonical_split", "load_dataset", "open_dataset"]
