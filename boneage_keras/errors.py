"""The errors that mean "bad input" (shown to users as one message, not a traceback)."""

from .config import ConfigError
from .data import DataError
from .images import ImageError


def user_errors() -> tuple[type[Exception], ...]:
    from .cache import CacheError
    from .evaluate import ModelFileError
    from .export import ExportError
    from .model import WeightsError
    from .train import RunDirError, TrainingInterrupted

    return (ConfigError, DataError, ImageError, WeightsError, RunDirError,
            TrainingInterrupted, ModelFileError, ExportError, CacheError)
