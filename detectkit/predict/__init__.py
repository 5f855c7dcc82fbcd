"""One prediction path: sources -> decode (EXIF) -> letterbox -> model -> postprocess -> Predictions.

``model.predict``, the LightningModule, ``detectkit predict``, export verification and the server
share these parts: :mod:`.sources` (inputs, through the one image decoder), :mod:`.pipeline`
(``predict``; defaults from ``model.inference``), :mod:`.step` (the one batch step: letterboxed
pixels -> model -> post-processing -> original pixels, also run by ``predict_step`` and the
server), :mod:`.slicing` (tiles of large images through that step, merged), :mod:`.draw` (the one
box drawer) and :mod:`.writers` (the one COCO results writer and the one video writer).
"""

from detectkit.predict.pipeline import IMAGE_EXTENSIONS, iter_source, load_image, predict
from detectkit.predict.results import ImagePrediction, Predictions
from detectkit.predict.slicing import SliceConfig
from detectkit.predict.sources import VIDEO_EXTENSIONS, SourceOptions

__all__ = ["predict", "iter_source", "load_image", "ImagePrediction", "Predictions", "IMAGE_EXTENSIONS",
           "VIDEO_EXTENSIONS", "SourceOptions", "SliceConfig"]
