"""Put this folder on PYTHONPATH to run Python as on a machine without some packages.

The top-level modules named in ``BONEAGE_TEST_HIDE`` (comma-separated, e.g.
``tensorflow,keras_cv``) stay installed but cannot be found: ``import tensorflow``
fails, ``importlib.util.find_spec("tensorflow")`` returns None (torch's own import-time
probes rely on that) and the name never enters ``sys.modules`` (Keras' preprocessing
layers check it). A path hook hides them, rather than ``sys.modules[name] = None``
(which Keras then mistakes for an imported TensorFlow) or a meta-path finder that
raises (which breaks ``import torch._dynamo``).
"""
import os
import sys
from importlib import machinery

HIDDEN = {name.strip() for name in os.environ.get("BONEAGE_TEST_HIDE", "").split(",")
          if name.strip()}


class _HidingFinder(machinery.FileFinder):
    def find_spec(self, fullname, target=None):
        if fullname.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(fullname, target)


if HIDDEN:
    _LOADERS = [(machinery.ExtensionFileLoader, machinery.EXTENSION_SUFFIXES),
                (machinery.SourceFileLoader, machinery.SOURCE_SUFFIXES),
                (machinery.SourcelessFileLoader, machinery.BYTECODE_SUFFIXES)]
    sys.path_hooks.insert(0, _HidingFinder.path_hook(*_LOADERS))
    sys.path_importer_cache.clear()
