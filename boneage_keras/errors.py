"""The errors that mean "bad input" (shown to users as one message, not a traceback)."""

from .config import ConfigError
from .data import DataError
from .images import ImageError


def user_errors() -> tuple[type[Exception], ...]:
    from .evaluate import ModelFileError
    from .model import WeightsError
    from .train import RunDirError, TrainingInterrupted

    return (ConfigError, DataError, ImageError, WeightsError, RunDirError,
            TrainingInterrupted, ModelFileError)
