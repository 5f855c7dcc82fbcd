"""One prediction path: sources -> decode (EXIF) -> letterbox -> model -> postprocess -> Predictions.

``model.predict``, the LightningModule, ``detectkit predict``, export verification and the server
share these parts: :mod:`.sources` (the one image decoder), :mod:`.pipeline` (``predict``),
:mod:`.draw` (the one box drawer) and :mod:`.writers` (the one COCO results writer).
"""

from detectkit.predict.pipeline import IMAGE_EXTENSIONS, iter_source, load_image, predict
from detectkit.predict.results import VIDEO_EXTENSIONS, ImagePrediction, Predictions

__all__ = ["predict", "iter_source", "load_image", "ImagePrediction", "Predictions", "IMAGE_EXTENSIONS",
           "VIDEO_EXTENSIONS"]
