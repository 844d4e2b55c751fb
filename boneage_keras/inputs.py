"""The inputs of a bone-age model, named once: ``image`` (S, S, 1) gray 0-255, and with
``model.use_sex`` also ``male`` (batch, 1), 1.0 for male. Loaders, the model, inference,
bench and export all pack them here (the ground floor: imports nothing).
"""

from __future__ import annotations

from typing import Any

IMAGE = "image"
SEX = "male"


def model_inputs(images: Any, male: Any = None, use_sex: bool = False) -> Any:
    """What a bone-age model is called with: ``images`` alone, or with the sex input
    ``{"image": images, "male": male}`` (arrays, tensors, Keras inputs or specs alike).

        >>> model.predict(model_inputs(x, male, preprocessing_of(model)["use_sex"]))
    """
    return {IMAGE: images, SEX: male} if use_sex else images
