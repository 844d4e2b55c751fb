"""boneage-keras: pediatric bone age from hand radiographs, on Keras 3 (torch, JAX or
TensorFlow).

Modules follow the data flow ``config -> data -> images -> loaders/augment -> model
-> train -> inference -> evaluate/explain/export -> serve``.

Keras is imported lazily: ``import boneage_keras`` alone loads no training framework
(the model server, ``boneage serve``, runs on onnxruntime only). Whenever Keras is
imported, before or after this package, the package's custom layers and the
``ToleranceAccuracy`` metric are registered, so plain
``keras.saving.load_model("best.keras")`` works in a process that imported
``boneage_keras``.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

__version__ = "0.2.0"


def _keras_imported() -> None:
    """What follows the import of Keras: on the TensorFlow backend, its search for
    physical devices (so the lines its C++ core prints, cuInit on a machine without a
    GPU, fall inside the silenced import; the logical devices stay open to
    ``distribute``), then the registration of our custom objects. Our modules may be
    mid-import here (the one that imported Keras), so nothing of theirs is called."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.list_physical_devices()
    from . import metrics, model  # noqa: F401  (registering is importing)


class _KerasLoader(importlib.abc.Loader):
    """Keras' own loader, with the backend checked first, TensorFlow's native start-up
    lines silenced, and :func:`_keras_imported` run after it."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:      # resource readers and the like
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        from .console import native_stderr_silenced
        from .extras import require_backend

        require_backend()     # a missing backend: one line naming its install extra
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _KerasFinder)]
        with native_stderr_silenced():   # on the TensorFlow backend Keras starts it
            self.loader.exec_module(module)
            _keras_imported()


class _KerasFinder(importlib.abc.MetaPathFinder):
    """Finds ``keras`` through the other finders and wraps its loader. Finding has no
    side effect (``importlib.util.find_spec("keras")`` only asks); the import itself
    removes this finder."""

    def find_spec(self, name: str, path=None, target=None):
        if name != "keras":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _KerasLoader(spec.loader)
                return spec
        return None


if "keras" in sys.modules:
    _keras_imported()
elif not any(isinstance(f, _KerasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _KerasFinder())
