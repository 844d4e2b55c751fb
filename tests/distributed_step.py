"""One optimizer step on N replicas against the same step on one device (test helper).

    python tests/distributed_step.py BULK_DIR [--bn] [-- CLI ARGS... [-- CLI ARGS...]]

Runs in every process of a distributed job (torchrun, or alone for JAX/TensorFlow
devices in one process). The step: plain SGD on a small conv net over 8 real RSNA
images, global batch 8, fed by the package's loader (each process its shard) and
prepared by boneage_keras.distribute; the reference is the same step, same weights and
same batch, on one device without the distribution. Prints one JSON line
``@@STEP@@{"max_diff": ..., "moved": ..., "replicas": ..., "processes": ...}``.
With ``--bn`` the net has a batch normalization layer (synchronized: JAX by
construction, TensorFlow with distribute.sync_batchnorm). After ``--``, each group of
arguments is a ``cli.py`` command run in the same processes (the distribution already
set up).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boneage_keras import distribute
from boneage_keras.config import load_config
from boneage_keras.loaders import BoneAgeDataset
from boneage_keras.train import compile_model


def small_net(bn: bool) -> keras.Model:
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2)(x)
    if bn:
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, bias_initializer="zeros")(x))


def main(argv: list[str]) -> None:
    groups = " ".join(argv).split(" -- ")   # (paths here have no spaces)
    argv, commands = groups[0].split(), [g.split() for g in groups[1:]]
    bulk, bn = Path(argv[0]), "--bn" in argv
    backend = keras.backend.backend()
    overrides = ["model.use_sex=false", "data.image_size=32", "train.batch_size=8",
                 "train.optimizer=sgd", "train.learning_rate=0.05", "data.workers=1",
                 "augment.horizontal_flip=false", "augment.rotation_degrees=0",
                 "augment.translation=0", "augment.scale=null", "augment.brightness=0",
                 "augment.contrast=null", "distribute.strategy=data_parallel",
                 f"distribute.sync_batchnorm={str(bn and backend == 'tensorflow').lower()}"]
    if backend != "torch":
        overrides.append("distribute.cpu_devices=2")
    cfg = load_config("cpu-bench", overrides)
    replicas = distribute.setup(cfg)
    labels = pd.read_csv(bulk / "labels.csv", dtype={"id": str}).head(8)
    table = labels.assign(path=[str(bulk / "images" / f"{i}.png") for i in labels["id"]],
                          male=labels["male"].astype(str).str.lower().eq("true"))

    keras.utils.set_random_seed(1)
    with replicas.local_scope():
        start = small_net(bn).get_weights()
        reference = compile_model(small_net(bn), cfg)
        reference.set_weights(start)
        reference.fit(BoneAgeDataset(table, cfg, training=True), epochs=1, verbose=0)
        expected = reference.get_weights()
    with replicas.scope():
        model = compile_model(small_net(bn), cfg)
    model.set_weights(start)
    replicas.prepare_model(model)
    model.fit(BoneAgeDataset(table, cfg, training=True, replicas=replicas), epochs=1,
              verbose=0)
    with replicas.local_values(model):
        got = model.get_weights()
    print("@@STEP@@" + json.dumps({
        "max_diff": max(float(np.abs(a - b).max()) for a, b in zip(got, expected)),
        "moved": max(float(np.abs(a - b).max()) for a, b in zip(expected, start)),
        "replicas": replicas.replicas, "processes": replicas.processes,
        "process": replicas.index}), flush=True)
    if commands:
        import cli

        for command in commands:
            cli.cli.main(command, standalone_mode=False)


if __name__ == "__main__":
    main(sys.argv[1:])
