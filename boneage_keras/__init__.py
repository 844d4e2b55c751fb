"""boneage-keras: pediatric bone age from hand radiographs, on Keras 3 (torch, JAX or
TensorFlow).

Modules follow the data flow ``config -> data -> images -> loaders/augment -> model
-> train -> inference -> evaluate/explain/export``. Importing the package registers its
custom layers and the ``ToleranceAccuracy`` metric, so plain
``keras.saving.load_model("best.keras")`` works after ``import boneage_keras``.
"""

__version__ = "0.2.0"

from .console import native_stderr_silenced as _silenced
from .extras import require_backend as _require_backend

_require_backend()      # a missing backend: one line naming its install extra
with _silenced():       # on the TensorFlow backend, importing Keras starts TensorFlow
    import keras  # noqa: F401

    from . import backend as _backend

    _backend.start_runtime()

from . import metrics as _metrics  # noqa: F401  registers ToleranceAccuracy
from . import model as _model  # noqa: F401  registers GrayPreprocess, LabelScale
