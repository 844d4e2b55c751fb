"""boneage-keras: pediatric bone age from hand radiographs, on Keras 3 (torch or TF).

Modules follow the data flow ``config -> data -> images -> loaders/augment -> model
-> train``; import what you need (``boneage_keras.model.load_model`` reads ``.keras``
files written by this package on either backend).
"""

__version__ = "0.1.0"
