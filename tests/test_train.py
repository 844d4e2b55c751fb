"""End-to-end training through the CLI on real images, on both backends and loaders."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, cli_here, run_cli

from boneage_keras.data import load_dataset, split_table, subsample
from boneage_keras.train import cosine_learning_rate

RUN_FILES = ("config.yaml", "split.csv", "history.csv", "best.keras", "last.keras",
             "curves.png", "train.log")


def test_cosine_schedule():
    lrs = [cosine_learning_rate(e, 1.0, 50, period=10) for e in range(21)]
    assert lrs[0] == 1.0 and lrs[10] == pytest.approx(0.0, abs=1e-12)
    assert lrs[20] == pytest.approx(1.0) and lrs[5] == pytest.approx(0.5)
    warm = [cosine_learning_rate(e, 1.0, 10, warmup=2) for e in range(10)]
    assert warm[:3] == [0.5, 1.0, 1.0] and all(np.diff(warm[2:]) < 0)


def test_weight_averaging_schedule_holds_the_rate_over_the_averaged_epochs():
    from boneage_keras.config import load_config
    from boneage_keras.train import learning_rate_at

    cfg = load_config("cpu-bench", ["train.epochs=10", "train.swa_epochs=3",
                                    "train.learning_rate=1.0", "train.warmup_epochs=0"])
    lrs = [learning_rate_at(e, cfg) for e in range(10)]
    assert lrs[0] == 1.0 and lrs[7:] == [0.1, 0.1, 0.1]   # a tenth of the rate
    assert all(np.diff(lrs[:7]) < 0) and lrs[6] > 0.1     # the cosine decays towards it
    cfg.train.swa_learning_rate = 0.3
    assert [learning_rate_at(e, cfg) for e in (6, 7, 9)][1:] == [0.3, 0.3]
    cfg.train.lr_schedule = "constant"
    assert [learning_rate_at(e, cfg) for e in (0, 6, 7)] == [1.0, 1.0, 0.3]
    cfg.train.swa_epochs = None   # off: the cosine over all epochs, down to zero
    assert learning_rate_at(9, cfg) == 1.0
    cfg.train.lr_schedule = "cosine"
    assert 0 < learning_rate_at(9, cfg) < 0.05


def test_cli_train_writes_complete_run(tmp_path, bulk_dir):
    # the TensorFlow path of the default config: tf.data and keras-cv (the other
    # pairs train elsewhere: torch + tf.data in conftest's trained_run; torch, JAX and
    # TensorFlow on the PyDataset loader in conftest's backend_runs); a quarter-width
    # ResNet18 (ResNet50 took twice as long here; it trains through fit on torch and
    # JAX in test_gpu_speed)
    proc = run_cli(["train", "--config", "configs/default.yaml", "--data-dir", str(bulk_dir),
                    "--set", "data.max_images=96", "--set", "data.image_size=32",
                    "--set", "model.backbone=resnet18", "--set", "model.width=0.25",
                    "--set", "model.weights=none", "--set", "train.epochs=1",
                    "--set", "train.batch_size=16", "--set", "data.loader=tfdata",
                    "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=run"],
                   backend="tensorflow")
    assert "input: tfdata loader, augmentation keras-cv engine" in proc.stderr
    assert "images: decoding the original files" in proc.stderr   # no cache prepared
    run = tmp_path / "run"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [0]
    assert {"val_mae", "val_tolerance_accuracy", "learning_rate"} <= set(history.columns)
    split = pd.read_csv(run / "split.csv", dtype={"id": str})
    assert list(split.columns) == ["id", "boneage", "male", "split"] and len(split) == 96
    # the split depends on the config and seed only, not on backend or loader
    table = subsample(load_dataset(bulk_dir, check_images=False)[0], 96, seed=42)
    expected = split_table(table, "random", 0.1, 0.0, seed=42)
    assert split["split"].tolist() == expected["split"].tolist()
    assert split["id"].tolist() == expected["id"].tolist()
    # best.keras reloads here, on torch (every backend alike: test_backends), and scores
    # its validation images as fit did on TensorFlow: what was saved is what was
    # validated (batch-norm statistics included)
    from boneage_keras.images import load_image
    from boneage_keras.model import load_model

    val = split[split["split"] == "val"]
    x = np.stack([load_image(bulk_dir / "images" / f"{i}.png", 32) for i in val["id"]])
    on_torch = load_model(run / "best.keras").predict(x, verbose=0).ravel()
    mae = np.abs(on_torch - val["boneage"].to_numpy()).mean()
    assert mae == pytest.approx(history["val_mae"].iloc[0], abs=0.05)


def test_interrupted_run_resumes_without_losing_epochs(tmp_path, bulk_dir):
    args = [sys.executable, str(REPO / "cli.py"), "train", "--data-dir", str(bulk_dir),
            "--set", "data.max_images=300", "--set", "data.image_size=32",
            "--set", "model.backbone=resnet18", "--set", "model.width=0.5",
            "--set", "model.weights=none",
            "--set", "train.epochs=3", "--set", "train.batch_size=16",
            "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=run"]
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    history = tmp_path / "run" / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--resume" in err, err[-2000:]
    done = len(pd.read_csv(history))
    assert 1 <= done < 3
    assert (tmp_path / "run" / "last.keras").is_file()
    cli_here(["train", "--resume", str(tmp_path / "run")])
    epochs = pd.read_csv(history)["epoch"].tolist()
    assert epochs == [0, 1, 2], epochs     # continued where it stopped, nothing repeated
    assert (tmp_path / "run" / "best.keras").is_file()


FAILS_HOLDING_AN_ITERATOR = """
import atexit, gc, sys, time, weakref
sys.path.insert(0, sys.argv[1])
gc.set_threshold(10**9)    # as after a long fit: the error's cycle is not collected early
import click, numpy as np, tensorflow as tf
from cli import FriendlyGroup
from boneage_keras.errors import BoneAgeError

held = []
atexit.register(lambda: print("iterators alive at exit:",
                              sum(ref() is not None for ref in held), file=sys.stderr))

@click.group(cls=FriendlyGroup)
def main():
    pass

@main.command()
def fail():
    def slow(i):
        time.sleep(0.05)
        return np.zeros(8, np.float32)
    data = tf.data.Dataset.range(1000).map(
        lambda i: tf.numpy_function(slow, [i], tf.float32), num_parallel_calls=2)
    batches = iter(data.prefetch(2))
    held.append(weakref.ref(batches))
    next(batches)                 # decodes in flight when the error leaves
    loop = {"batches": batches}   # held in a reference cycle, as Keras' fit loop does
    loop["self"] = loop
    raise BoneAgeError("stopped with a tf.data iterator alive")

main(["fail"])
"""


def test_a_failed_command_frees_its_tf_data_iterator_before_exit(tmp_path):
    # an interrupted fit leaves its tf.data iterator in reference cycles of the error's
    # traceback; left to the interpreter's shut-down, the decodes still in flight hang
    # the exit (this script without the collection in FriendlyGroup: alive 1, no exit)
    pytest.importorskip("tensorflow")
    script = tmp_path / "fails.py"
    script.write_text(FAILS_HOLDING_AN_ITERATOR)
    proc = subprocess.run([sys.executable, str(script), str(REPO)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: stopped with a tf.data iterator alive" in proc.stderr
    assert "iterators alive at exit: 0" in proc.stderr, proc.stderr[-2000:]


def test_existing_run_dir_is_refused(tmp_path, bulk_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("name: x\n")
    (tmp_path / "run" / "history.csv").write_text("epoch,loss\n0,3.0\n")   # it trained
    proc = cli_here(["train", "--data-dir", str(bulk_dir), "--set",
                    f"train.output_dir={tmp_path}", "--set", "train.run_name=run"],
                   check=False)
    assert proc.returncode == 2 and "already holds a trained run" in proc.stderr
    assert (tmp_path / "run" / "config.yaml").read_text() == "name: x\n"   # untouched


def test_bad_config_is_one_clear_line(bulk_dir):
    proc = cli_here(["train", "--data-dir", str(bulk_dir), "--set", "train.epochz=1"],
                   check=False)
    assert proc.returncode == 2
    assert "unknown key 'train.epochz'" in proc.stderr and "Traceback" not in proc.stderr


# --- nothing lost: resume, checkpoints, bad values (in-process, tiny runs) -----------


def _tiny(bulk_dir, out, name, *extra):
    from boneage_keras.config import load_config

    return load_config("default", [
        f"data.data_dir={bulk_dir}", "data.max_images=64", "data.image_size=32",
        "model.backbone=resnet18", "model.weights=none", "train.batch_size=16",
        "augment.horizontal_flip=false", "augment.rotation_degrees=0",
        "augment.translation=0", "augment.scale=null", "augment.brightness=0",
        "augment.contrast=null", f"train.output_dir={out}", f"train.run_name={name}",
        *extra])


def test_resume_keeps_the_best_model_and_the_patience(tmp_path, bulk_dir):
    from boneage_keras.train import read_state, resume, train

    result = train(_tiny(bulk_dir, tmp_path, "run", "train.epochs=2",
                         "train.early_stopping_patience=2"), verbose=0)
    run = result.run_dir
    state = read_state(run)
    assert state["finished"] and state["epoch"] == 2
    # pretend epoch 1 was unbeatable and one epoch has waited since: a resumed epoch
    # must neither replace best.keras nor reset the patience counter
    state.update(best=1.0, best_epoch=0, wait=1, finished=False)
    (run / "backup" / "state.json").write_text(json.dumps(state))
    best = (run / "best.keras").read_bytes()
    again = resume(run, ["train.epochs=6"], verbose=0)
    assert (run / "best.keras").read_bytes() == best
    assert again.best_epoch == 1 and again.stopped_early
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]      # stopped: patience 2 reached
    assert again.best["val_mae"] == pytest.approx(history.loc[0, "val_mae"])
    assert read_state(run)["stopped_early"]


def test_finished_run_is_refused_or_extended_explicitly(tmp_path, bulk_dir):
    from boneage_keras.train import train

    run = train(_tiny(bulk_dir, tmp_path, "run", "train.epochs=1"), verbose=0).run_dir
    proc = cli_here(["train", "--resume", str(run)], check=False)
    assert proc.returncode == 2 and "has finished after 1 epoch" in proc.stderr
    assert "--set train.epochs=N" in proc.stderr
    proc = cli_here(["train", "--resume", str(run), "--set", "model.backbone=resnet50"],
                   check=False)
    assert proc.returncode == 2 and "'model.backbone' cannot change" in proc.stderr
    proc = cli_here(["train", "--resume", str(run), "--config", "default"], check=False)
    assert proc.returncode == 2 and "drop --config" in proc.stderr
    cli_here(["train", "--resume", str(run), "--set", "train.epochs=2"])
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [0, 1]
    assert "epochs: 2" in (run / "config.yaml").read_text()


def test_weight_average_is_validated_and_saved_and_resume_keeps_trained_weights(
        tmp_path, bulk_dir):
    """train.ema_decay: the moving average is what validation scores and what
    best.keras / last.keras hold; backup/ keeps the trained weights with the averages
    in the optimizer state (not swapped: a resumed run trains on from the trained
    weights), before and after a resume."""
    from boneage_keras.backend import moving_averages
    from boneage_keras.images import load_image
    from boneage_keras.model import build_model, load_model
    from boneage_keras.train import compile_model, read_state, resume, train

    cfg = _tiny(bulk_dir, tmp_path, "run", "train.epochs=2", "train.ema_decay=0.9",
                "train.early_stopping_patience=null", "train.learning_rate=0.01")
    run = train(cfg, verbose=0).run_dir
    split = pd.read_csv(run / "split.csv", dtype={"id": str})
    val = split[split["split"] == "val"]
    x = np.stack([load_image(bulk_dir / "images" / f"{i}.png", 32) for i in val["id"]])

    def check(epochs):
        history = pd.read_csv(run / "history.csv")
        assert history["epoch"].tolist() == list(range(epochs))
        last = load_model(run / "last.keras")
        mae = np.abs(last.predict(x, verbose=0).ravel() - val["boneage"].to_numpy()).mean()
        assert mae == pytest.approx(history["val_mae"].iloc[-1], abs=0.05)  # saved = scored
        model = compile_model(build_model(cfg), cfg)
        model.optimizer.build(model.trainable_variables)
        model.load_weights(run / "backup" / read_state(run)["weights"])
        pairs = moving_averages(model.optimizer)
        assert len(pairs) == len(last.trainable_weights)
        for (_, average), saved in zip(pairs, last.trainable_weights):
            np.testing.assert_allclose(keras_numpy(average), keras_numpy(saved), atol=1e-6)
        # at 1e-2 the trained weights run ahead of their average
        assert max(np.abs(keras_numpy(v) - keras_numpy(a)).max() for v, a in pairs) > 1e-3

    check(2)
    resume(run, ["train.epochs=3"], verbose=0)
    check(3)


def test_swa_run_validates_and_saves_the_average_of_the_last_epochs(tmp_path, bulk_dir):
    """train.swa_epochs on real images: the last two epochs run at a tenth of the rate,
    last.keras holds the equal-weight average of their trained weights (the first kept
    in backup/swa-0002.npz, the second in the resumable state), and validation scored
    that average as saved."""
    from boneage_keras.images import load_image
    from boneage_keras.model import build_model, load_model
    from boneage_keras.train import compile_model, read_state, train

    cfg = _tiny(bulk_dir, tmp_path, "swa", "train.epochs=3", "train.swa_epochs=2",
                "train.early_stopping_patience=null", "train.learning_rate=0.01")
    run = train(cfg, verbose=0).run_dir
    history = pd.read_csv(run / "history.csv")
    np.testing.assert_allclose(history["learning_rate"], [0.01, 0.001, 0.001], rtol=1e-5)
    model = compile_model(build_model(cfg), cfg)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(run / "backup" / read_state(run)["weights"])
    trained = [keras_numpy(v) for v in model.trainable_variables]
    with np.load(run / "backup" / "swa-0002.npz") as first, \
            np.load(run / "backup" / "swa-0003.npz") as both:
        assert (int(first["count"]), int(both["count"])) == (1, 2)
        epoch2 = [first[f"w{i}"] for i in range(len(trained))]
        average = [both[f"w{i}"] for i in range(len(trained))]
    last = load_model(run / "last.keras")
    assert len(last.trainable_weights) == len(trained)
    for e2, e3, avg, saved in zip(epoch2, trained, average, last.trainable_weights):
        np.testing.assert_allclose(avg, (e2 + e3) / 2, atol=1e-6)
        np.testing.assert_allclose(keras_numpy(saved), avg, atol=1e-6)
    # backup/ trains on from the weights as trained, not from their average
    assert max(np.abs(e3 - avg).max() for e3, avg in zip(trained, average)) > 1e-4
    split = pd.read_csv(run / "split.csv", dtype={"id": str})
    val = split[split["split"] == "val"]
    x = np.stack([load_image(bulk_dir / "images" / f"{i}.png", 32) for i in val["id"]])
    mae = np.abs(last.predict(x, verbose=0).ravel() - val["boneage"].to_numpy()).mean()
    assert mae == pytest.approx(history["val_mae"].iloc[-1], abs=0.05)


def test_snapshot_average_continues_after_a_resume_and_restarts_when_moved(tmp_path):
    import keras

    from boneage_keras.callbacks import SnapshotAverage

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])

    def run_epoch(average, epoch, value, validate=True):
        average.use_average.on_epoch_begin(epoch)
        for variable in model.trainable_variables:
            variable.assign(np.full(variable.shape, value, "float32"))
        if validate:
            average.use_average.on_test_begin()
            seen = keras_numpy(model.trainable_variables[0]).copy()
        average.use_average.on_epoch_end(epoch)
        seen = seen if validate else keras_numpy(model.trainable_variables[0]).copy()
        average.use_trained.on_epoch_end(epoch)
        np.testing.assert_allclose(keras_numpy(model.trainable_variables[0]), value)
        return float(seen.mean())

    first = SnapshotAverage(model, start=1, backup=tmp_path)
    assert run_epoch(first, 0, 7.0) == 7.0             # before the averaged epochs
    assert run_epoch(first, 1, 1.0) == 1.0
    assert run_epoch(first, 2, 3.0, validate=False) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swa-0002.npz", "swa-0003.npz"]
    # killed after epoch 3's state: the resumed run continues that average
    resumed = SnapshotAverage(model, start=1, backup=tmp_path, epochs_done=3)
    assert run_epoch(resumed, 3, 8.0) == 4.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swa-0003.npz", "swa-0004.npz"]
    # extended so that the averaged epochs begin later: the average starts again
    moved = SnapshotAverage(model, start=3, backup=tmp_path, epochs_done=4)
    assert run_epoch(moved, 4, 5.0) == 5.0


def test_sex_film_run_trains_the_modulation_and_scores_and_explains_with_sex(
        tmp_path, bulk_dir):
    """model.sex_film on real images: training moves every stage's modulation off the
    identity, validation scores the model as saved (the batch-norm refresh before it
    gives the backbone the sex too), and Grad-CAM explains it with the sex."""
    from boneage_keras.errors import DataError
    from boneage_keras.explain import grad_cam
    from boneage_keras.images import load_image
    from boneage_keras.inputs import model_inputs
    from boneage_keras.model import SexFiLM, load_model
    from boneage_keras.train import train

    cfg = _tiny(bulk_dir, tmp_path, "film", "train.epochs=2", "model.width=0.25",
                "model.use_sex=true", "model.sex_film=true",
                "train.early_stopping_patience=null", "train.learning_rate=0.01")
    run = train(cfg, verbose=0).run_dir
    split = pd.read_csv(run / "split.csv", dtype={"id": str})
    val = split[split["split"] == "val"]
    x = np.stack([load_image(bulk_dir / "images" / f"{i}.png", 32) for i in val["id"]])
    male = val["male"].to_numpy(np.float32).reshape(-1, 1)
    last = load_model(run / "last.keras")
    predicted = last.predict(model_inputs(x, male, use_sex=True), verbose=0).ravel()
    mae = np.abs(predicted - val["boneage"].to_numpy()).mean()
    assert mae == pytest.approx(pd.read_csv(run / "history.csv")["val_mae"].iloc[-1],
                                abs=0.05)
    films = [layer for layer in last.get_layer("resnet18").layers
             if isinstance(layer, SexFiLM)]
    assert len(films) == 4
    assert all(np.abs(keras_numpy(layer.kernel)).max() > 1e-4 for layer in films)
    heat, months = grad_cam(last, x[:4], male[:4])
    assert heat.shape == (4, 32, 32) and np.isfinite(heat).all()
    np.testing.assert_allclose(months, predicted[:4], atol=0.05)
    with pytest.raises(DataError, match="sex"):
        grad_cam(last, x[:4])


def keras_numpy(value):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(value))


def test_kill_while_a_checkpoint_is_written_leaves_the_previous_file(tmp_path, bulk_dir):
    """SIGKILL in the middle of writing epoch 2's checkpoints: the files of epoch 1
    stay complete, and the run resumes from there."""
    script = tmp_path / "killed.py"
    script.write_text(f"""
import os, signal, keras
from boneage_keras.train import train
from boneage_keras.config import load_config
calls = []
real_save = keras.Model.save
def save(self, path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 2:     # epoch 2's last.keras (epoch 1's best.keras is a file copy)
        with open(path, "wb") as f:
            f.write(b"PK half a zip")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(self, path, *args, **kwargs)
keras.Model.save = save
cfg = load_config("default", {_tiny_args(bulk_dir, tmp_path)!r})
cfg.train.learning_rate = 1e-12   # nothing improves: epoch 2 would overwrite last.keras
train(cfg, verbose=0)
""")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "KERAS_BACKEND": "torch"},
                          timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "run"
    import zipfile

    for name in ("best.keras", "last.keras"):
        assert zipfile.is_zipfile(run / name), name
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [0, 1]
    assert [p.name for p in run.iterdir() if ".tmp-" in p.name]   # the torn write
    cli_here(["train", "--resume", str(run)])
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [0, 1, 2]
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]


def _tiny_args(bulk_dir, out):
    return [f"data.data_dir={bulk_dir}", "data.max_images=64", "data.image_size=32",
            "model.backbone=resnet18", "model.weights=none", "train.batch_size=16",
            "augment.horizontal_flip=false", "augment.rotation_degrees=0",
            "augment.translation=0", "augment.scale=null", "augment.brightness=0",
            "augment.contrast=null", f"train.output_dir={out}", "train.run_name=run",
            "train.epochs=3", "train.early_stopping_patience=null"]


def test_early_stopping_stops_and_the_schedule_is_applied(tmp_path, bulk_dir):
    from boneage_keras.train import cosine_learning_rate, train

    # a learning rate too small to move the zero-initialised head: predictions stay at
    # the training mean, nothing improves, patience 3 stops after epoch 4 of 8
    result = train(_tiny(bulk_dir, tmp_path, "stop", "train.epochs=8",
                         "train.early_stopping_patience=3", "train.learning_rate=1e-9",
                         "train.warmup_epochs=2"), verbose=0)
    history = pd.read_csv(result.run_dir / "history.csv")
    assert result.stopped_early and history["epoch"].tolist() == [0, 1, 2, 3]
    # two warmup epochs, then default.yaml's cosine with a period of 10 epochs
    expected = [cosine_learning_rate(e, 1e-9, 8, 10, 2) for e in range(4)]
    np.testing.assert_allclose(history["learning_rate"], expected, rtol=1e-5)
    assert expected[0] < expected[1] == expected[2] > expected[3]   # warmup, then decay


@pytest.mark.parametrize("optimizer, loss", [("adamw", "huber"), ("sgd", "mse")])
def test_other_optimizers_and_losses_train(tmp_path, bulk_dir, optimizer, loss):
    from boneage_keras.model import load_model
    from boneage_keras.train import train

    result = train(_tiny(bulk_dir, tmp_path, "run", "train.epochs=1",
                         f"train.optimizer={optimizer}", f"train.loss={loss}",
                         "train.learning_rate=0.0001", "train.weight_decay=0.0001"),
                   verbose=0)
    history = pd.read_csv(result.run_dir / "history.csv")
    assert np.isfinite(history["loss"]).all()
    # huber (delta 12) and mse differ from MAE, so the loss column says which was used
    assert not np.allclose(history["loss"], history["mae"])
    model = load_model(str(result.run_dir / "best.keras"))
    assert getattr(model, "optimizer", None) is None   # for inference: no optimizer
    assert (result.run_dir / "backup" / "state-0001.weights.h5").is_file()   # it is here


@pytest.mark.parametrize("loader", ["tfdata", "pydataset"])
def test_steps_per_epoch_limits_each_epoch(tmp_path, bulk_dir, loader):
    proc = run_cli(["train", "--data-dir", str(bulk_dir), "--set", "data.max_images=96",
                    "--set", "data.image_size=32", "--set", "model.backbone=resnet18",
                    "--set", "model.weights=none", "--set", "train.epochs=2",
                    "--set", "train.batch_size=8", "--set", "train.steps_per_epoch=3",
                    "--set", f"data.loader={loader}",
                    "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=r"])
    assert proc.stdout.count("3/3 - ") == 2, proc.stdout     # 3 steps, not 11
    assert "\x1b[" not in proc.stdout + proc.stderr          # no colour codes in a pipe
    assert "I0000" not in proc.stderr and "oneDNN" not in proc.stderr


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, bulk_dir):
    proc = cli_here(["train", "--data-dir", str(bulk_dir), "--set", "data.max_images=64",
                    "--set", "data.image_size=32", "--set", "model.backbone=resnet18",
                    "--set", "model.weights=none", "--set", "train.epochs=2",
                    "--set", "train.learning_rate=1e30", "--set", "train.batch_size=16",
                    "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=r"],
                   check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training stopped: the loss became") and \
        "at epoch 1, batch" in line and "Traceback" not in proc.stderr
    # no epoch finished: nothing of the run is left, so the name can be used again
    assert not (tmp_path / "r").exists() or not any(
        p.name in ("config.yaml", "split.csv", "best.keras") for p in (tmp_path / "r").iterdir())


def test_failed_start_leaves_the_run_name_free(tmp_path, bulk_dir):
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "labels.csv").write_text("id,boneage,male\n1,inf,True\n2,1e9,False\n")
    args = ["--set", "data.image_size=32", "--set", "model.backbone=resnet18",
            "--set", "model.weights=none", "--set", "train.epochs=1",
            "--set", "data.max_images=40",
            "--set", f"train.output_dir={tmp_path / 'runs'}", "--set", "train.run_name=r"]
    proc = cli_here(["train", "--data-dir", str(bad), *args], check=False)
    assert proc.returncode == 2 and "no usable rows" in proc.stderr
    assert "1 dropped for bad label (1)" in proc.stderr
    assert "1 dropped for age out of range (2)" in proc.stderr
    assert not (tmp_path / "runs" / "r").exists()
    cli_here(["train", "--data-dir", str(bulk_dir), *args])   # the same name works now
    assert (tmp_path / "runs" / "r" / "best.keras").is_file()


def test_mixed_precision_on_a_cpu_is_bfloat16_and_learns_real_images(bulk_dir):
    """No GPU here: `train.mixed_precision` picks bfloat16 (no loss scaling; what AMX
    multiplies). The convolutions then compute in bfloat16, the output stays float32,
    and training steps on real images lower the loss."""
    import keras

    from boneage_keras.backend import mixed_precision_policy
    from boneage_keras.config import load_config
    from boneage_keras.images import load_image
    from boneage_keras.model import build_model
    from boneage_keras.train import compile_model

    assert mixed_precision_policy() == "mixed_bfloat16"
    table = pd.read_csv(bulk_dir / "labels.csv", dtype={"id": str})[:16]
    images = np.stack([load_image(bulk_dir / "images" / f"{i}.png", 64, "stretch")
                       for i in table["id"]]).astype(np.float32)
    ages = table["boneage"].to_numpy(np.float32)
    cfg = load_config("cpu-bench", ["data.image_size=64", "model.use_sex=false",
                                    "train.mixed_precision=true"])
    keras.mixed_precision.set_global_policy(mixed_precision_policy())
    try:
        model = compile_model(build_model(cfg, float(ages.mean()), 40.0), cfg)
        backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
        convs = [layer for layer in backbone._flatten_layers()
                 if isinstance(layer, keras.layers.Conv2D)]
        assert convs and {c.compute_dtype for c in convs} == {"bfloat16"}
        losses = [float(model.train_on_batch(images, ages)[0]) for _ in range(8)]
        out = model.predict(images, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == np.float32 and np.isfinite(losses).all()
    assert losses[-1] < losses[0]


def test_monitor_picks_best_keras_by_the_chosen_figure(tmp_path, bulk_dir):
    from boneage_keras.callbacks import BestEpoch
    from boneage_keras.config import ConfigError
    from boneage_keras.model import load_model
    from boneage_keras.train import train

    # validation figures where accuracy and MAE disagree on the best epoch
    logs = [{"val_tolerance_accuracy": 0.5, "val_mae": 12.0, "val_rmse": 15.0},
            {"val_tolerance_accuracy": 0.6, "val_mae": 11.0, "val_rmse": 16.0},
            {"val_tolerance_accuracy": 0.55, "val_mae": 10.0, "val_rmse": 14.0},
            {"val_tolerance_accuracy": 0.52, "val_mae": 10.5, "val_rmse": 13.0}]
    for monitor, expected in [("val_tolerance_accuracy", 1), ("val_mae", 2),
                              ("val_rmse", 3), ("last", 3)]:
        best = BestEpoch(None, monitor=monitor)
        for epoch, row in enumerate(logs):
            best.on_epoch_end(epoch, row)
        assert best.best_epoch == expected, monitor

    # on real images: a rate too small to change the predictions leaves the accuracy
    # flat, so the default keeps epoch 1 and `last` takes epoch 3 into best.keras
    result = train(_tiny(bulk_dir, tmp_path, "last", "train.monitor=last",
                         "train.early_stopping_patience=null", "train.epochs=3",
                         "train.learning_rate=1e-9"), verbose=0)
    assert result.best_epoch == 3
    best_model = load_model(str(result.run_dir / "best.keras"))
    last_model = load_model(str(result.run_dir / "last.keras"))
    for a, b in zip(best_model.weights, last_model.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ConfigError, match="train.monitor"):
        train(_tiny(bulk_dir, tmp_path, "bad", "train.monitor=last",
                    "train.early_stopping_patience=3"), verbose=0)
