"""One optimizer step on N replicas against the same step on one device (test helper).

    python tests/distributed_step.py BULK_DIR [--bn] [--kill-process-1-in-epoch N]
        [-- CLI ARGS... [-- CLI ARGS...]]

Runs in every process of a distributed job (torchrun, or alone for JAX/TensorFlow
devices in one process). The step: plain SGD on a small conv net over 8 real RSNA
images, global batch 8, fed by the package's loader (each process its shard) and
prepared by boneage_keras.distribute; the reference is the same step, same weights and
same batch, on one device without the distribution. Prints one JSON line
``@@STEP@@{"max_diff": ..., "moved": ..., "replicas": ..., "processes": ...}``.
With ``--bn`` the net has a batch normalization layer (synchronized: JAX by
construction, TensorFlow with distribute.sync_batchnorm). After ``--``, each group of
arguments is a ``cli.py`` command run in the same processes (the distribution already
set up). With ``--kill-process-1-in-epoch N``, process 1 of a job's first attempt
(torchrun's restart count 0) sends itself SIGKILL as the second step of training
epoch N (1-based) begins, printing ``@@KILLED@@<time>`` first: the other process is
then between two collectives with it, whatever the machine's load (a kill from
outside can land after that epoch has finished).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boneage_keras import distribute
from boneage_keras import train as train_module
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


class KillInEpoch(keras.callbacks.Callback):
    """SIGKILL to this process as the second step of epoch ``epoch`` (1-based) begins."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch, self.current = epoch, -1

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self.current = epoch + 1

    def on_train_batch_begin(self, batch, logs=None) -> None:
        if self.current == self.epoch and batch == 1:
            print(f"@@KILLED@@{time.time()}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def kill_process_1_in_epoch(epoch: int) -> None:
    """Every ``fit`` of the CLI's training in this process gets :class:`KillInEpoch`
    when this is process 1 of a first attempt."""
    if os.environ.get("RANK") != "1" or os.environ.get("TORCHELASTIC_RESTART_COUNT") != "0":
        return
    fit_epochs = train_module.fit_epochs

    def with_kill(cfg, model, train_data, val_data, run, *args, **kwargs):
        run.callbacks.append(KillInEpoch(epoch))
        return fit_epochs(cfg, model, train_data, val_data, run, *args, **kwargs)

    train_module.fit_epochs = with_kill


def main(argv: list[str]) -> None:
    groups = " ".join(argv).split(" -- ")   # (paths here have no spaces)
    argv, commands = groups[0].split(), [g.split() for g in groups[1:]]
    bulk, bn = Path(argv[0]), "--bn" in argv
    if "--kill-process-1-in-epoch" in argv:
        kill_process_1_in_epoch(int(argv[argv.index("--kill-process-1-in-epoch") + 1]))
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
