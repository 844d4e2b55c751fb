"""Command line of boneage-keras: ``python cli.py COMMAND --help`` (or ``boneage``).

Each command parses its arguments, calls one library function and prints the result.
The Keras backend comes from KERAS_BACKEND (torch or tensorflow), e.g.

    KERAS_BACKEND=torch python cli.py train --config configs/default.yaml --data-dir DIR
"""

from __future__ import annotations

import gc
import logging
import os
import sys

import click


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    logging.getLogger("boneage_keras").setLevel(logging.INFO)


class FriendlyGroup(click.Group):
    """Turns the package's input errors into one clear message and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as err:
            from boneage_keras.errors import BoneAgeError

            if not isinstance(err, BoneAgeError):
                raise
            click.echo(f"error: {err}", err=True)
            if err.exit_at_once:      # skip the collectives' shut-down (a lost process)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
        # The error's traceback is dropped here; collect what the failed command held
        # (a tf.data iterator of an interrupted fit) while Python is whole: freed in the
        # interpreter's shut-down instead, such an iterator can hang the exit.
        gc.collect()
        sys.exit(2)


@click.group(cls=FriendlyGroup)
@click.option("--verbose", is_flag=True,
              help="Also show TensorFlow's native start-up lines and debug logs.")
def cli(verbose: bool) -> None:
    """Bone age (months) from hand radiographs with Keras 3."""
    if verbose:
        os.environ["BONEAGE_VERBOSE"] = "1"


@cli.command()
@click.option("--config", "config_path", default=None,
              help="YAML config file or packaged recipe name (default: default; "
                   "not with --resume, the run holds its config).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Data folder (Kaggle or flat layout); default ./data/rsna-bone-age, "
                   "else download with kagglehub.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set train.epochs=3 (repeatable).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue a run directory from its last finished epoch; with --set "
                   "train.epochs=N, extend a finished run to N epochs.")
def train(config_path: str | None, data_dir: str | None, overrides: tuple[str, ...],
          resume_dir: str | None) -> None:
    """Train a model and write a run directory (config, split, history, best.keras)."""
    _setup_logging(True)
    from boneage_keras.config import load_config
    from boneage_keras.train import resume
    from boneage_keras.train import train as run_training

    sets = list(overrides) + ([f"data.data_dir={data_dir}"] if data_dir else [])
    verbose = 1 if sys.stdout.isatty() else 2
    if resume_dir is not None:
        if config_path is not None:
            raise click.UsageError("--resume continues a run with the config it holds; "
                                   "drop --config (use --set train.epochs=N to extend).")
        result = resume(resume_dir, sets, verbose=verbose)
    else:
        cfg = load_config(config_path or "default", sets)
        result = run_training(cfg, verbose=verbose)
    from boneage_keras.summaries import calibration_summary, train_summary

    click.echo(train_summary(result.run_dir, result.best_epoch, result.best,
                             result.process))
    if result.chief:
        from boneage_keras.calibration import CalibrationError
        from boneage_keras.evaluate import calibrate_run

        try:
            click.echo(calibration_summary(result.run_dir, calibrate_run(result.run_dir)))
        except CalibrationError as err:
            click.echo(f"No calibration for this run: {err}")


def _mc_samples(ctx, param, value: int) -> int:
    if value == 1 or value < 0:
        raise click.BadParameter(f"{value}: use 0 (off) or at least 2 samples.")
    return value


def _tta_option(f):
    f = click.option("--mc-samples", type=int, default=0, show_default=True,
                     callback=_mc_samples,
                     help="MC-dropout samples per image (0 = off, >= 2: std and 90% "
                          "interval).")(f)
    return click.option("--tta", type=click.IntRange(1, 8), default=1, show_default=True,
                        help="Test-time augmentation views to average (1 = off, max 8).")(f)


@cli.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(file_okay=False))
@click.option("--model", "model_paths", multiple=True, type=click.Path(),
              help="A model file (.keras, SavedModel folder, .onnx) instead of RUN_DIR; "
                   "repeat for an ensemble.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Labelled data (required with --model; default for RUN_DIR: its own).")
@click.option("--split", type=click.Choice(["auto", "val", "test", "selection", "all"]),
              default=None,
              help="Which images: RUN_DIR default auto (its selection split if it has "
                   "one, else test, else val); --model default all.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: RUN_DIR, or ./evaluation with --model).")
@click.option("--tolerance", type=click.FloatRange(0, min_open=True), default=None,
              help="Tolerance in months (default: the run's, else 12).")
@click.option("--recalibrate", is_flag=True,
              help="RUN_DIR with a selection or test split: fit the regression-to-the-"
                   "mean correction and the conformal 90%% interval on its calibration "
                   "split (else validation; saved as calibration.json) and score them "
                   "on the selection or test split.")
@_tta_option
def evaluate(run_dirs, model_paths, data_dir, split, out_dir, tolerance, recalibrate, tta,
             mc_samples) -> None:
    """Metrics, predictions.csv, figures and report.html for runs or model files.

    Several RUN_DIRs (or --model repeated) are evaluated as an ensemble."""
    _setup_logging(False)
    from boneage_keras.evaluate import evaluate_model, evaluate_run

    if bool(run_dirs) == bool(model_paths):
        raise click.UsageError("give either RUN_DIR... or --model FILE --data-dir DIR.")
    if run_dirs:
        result = evaluate_run(list(run_dirs), split or "auto", data_dir, out_dir, tolerance,
                              tta=tta, mc_samples=mc_samples, recalibrate=recalibrate)
    else:
        if recalibrate:
            raise click.UsageError("--recalibrate takes RUN_DIR (its validation split is "
                                   "what the correction is fitted on), not --model.")
        if data_dir is None:
            raise click.UsageError("--model needs --data-dir with labelled images.")
        result = evaluate_model(list(model_paths), data_dir, split or "all",
                                out_dir or "evaluation", tolerance or 12.0, tta=tta,
                                mc_samples=mc_samples)
    from boneage_keras.summaries import metrics_summary

    click.echo(metrics_summary(result.metrics))
    click.echo(f"wrote {result.out_dir}/metrics.json, predictions.csv, figures, report.html")


@cli.command()
@click.option("--model", "model_paths", required=True, multiple=True, type=click.Path(),
              help="A .keras file, run directory, SavedModel folder or .onnx; repeat for "
                   "an ensemble.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Write the predictions to this CSV (default: print them).")
@click.option("--sex", type=click.Choice(["M", "F"], case_sensitive=False), default=None,
              help="Sex for single images/folders, for models that use it.")
@click.option("--sex-override", is_flag=True,
              help="Use --sex even where a DICOM header's PatientSex says otherwise.")
@click.option("--chronological-age", type=click.FloatRange(0), default=None,
              metavar="MONTHS", help="Chronological age for images without one in a "
                                     "DICOM header or CSV column (adds difference).")
@click.option("--id-from", type=click.Choice(["file", "sop"]), default="file",
              show_default=True, help="Name DICOM rows by file name or SOPInstanceUID.")
@click.option("--recalibrate", is_flag=True,
              help="Apply the calibration stored with the model (evaluate --recalibrate): "
                   "corrected months and a conformal 90%% interval.")
@_tta_option
@click.argument("inputs", nargs=-1, required=True)
def predict(model_paths, output, sex, sex_override, chronological_age, id_from,
            recalibrate, tta, mc_samples, inputs) -> None:
    """Bone age for images (PNG, JPEG, DICOM), folders of them, or a Kaggle test CSV."""
    _setup_logging(False)
    from boneage_keras.inference import predict_inputs

    # The progress bar prints to stdout, so it is shown only when the CSV goes to a file.
    result = predict_inputs(list(model_paths), inputs, sex, output,
                            progress=output is not None, tta=tta, mc_samples=mc_samples,
                            sex_override=sex_override, chronological_age=chronological_age,
                            id_from=id_from, recalibrate=recalibrate)
    if output is None:
        click.echo(result.to_csv(index=False, float_format="%.2f"), nl=False)
    else:
        click.echo(f"wrote {len(result)} predictions to {output}")
    from boneage_keras.summaries import prediction_failures

    failures = prediction_failures(result, output)
    if failures:
        click.echo(failures, err=True)
        sys.exit(1)


@cli.command()
@click.argument("model_path", type=click.Path())
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the overlays, gradcam_grid.png and heatmaps.npz.")
@click.option("--sex", type=click.Choice(["M", "F"], case_sensitive=False), default=None,
              help="Sex for single images/folders, for models that use it.")
def explain(model_path, inputs, out_dir, sex) -> None:
    """Grad-CAM heatmaps of MODEL (.keras or run dir) on images, folders or a test CSV."""
    _setup_logging(False)
    from boneage_keras.explain import explain_images

    result = explain_images(model_path, inputs, out_dir, sex)
    click.echo(result.to_csv(index=False, float_format="%.2f"), nl=False)
    click.echo(f"wrote {len(result)} overlays, gradcam_grid.png and heatmaps.npz to "
               f"{out_dir}")


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option("--resamples", type=click.IntRange(100), default=1000, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--out", "out_json", type=click.Path(dir_okay=False), default=None,
              help="Also write the result as JSON.")
def compare(a, b, resamples, seed, out_json) -> None:
    """Is B better than A? Paired bootstrap CI of MAE(B) - MAE(A) on shared ids.

    A and B are run directories (evaluated) or predictions.csv files.
    """
    from boneage_keras.compare import compare_predictions
    from boneage_keras.summaries import comparison_summary

    click.echo(comparison_summary(compare_predictions(a, b, resamples, seed, out_json)))


@cli.command()
@click.option("--data-dir", required=True, type=click.Path(file_okay=False),
              help="The data folder to cache (Kaggle or flat layout).")
@click.option("--size", type=click.IntRange(32), default=256, show_default=True,
              help="Cached side length; serves any image_size up to it.")
@click.option("--resize", type=click.Choice(["pad", "stretch"]), default="pad",
              show_default=True)
@click.option("--crop-hand", is_flag=True,
              help="Crop to the hand first (for runs with data.crop_hand: true).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where to write it (default: DATA_DIR/.boneage-cache).")
def prepare(data_dir, size, resize, crop_hand, cache_dir) -> None:
    """Decode every image once into a uint8 cache that train/evaluate read."""
    _setup_logging(True)
    from boneage_keras.cache import prepare_cache
    from boneage_keras.images import geometry_name

    geometry = geometry_name(resize, crop_hand)
    meta = prepare_cache(data_dir, size, geometry, cache_dir)
    click.echo(f"cache ready: {meta['rows']} images at {size} px ({geometry})")


@cli.command()
@click.option("--config", "config_path", default="default", show_default=True,
              help="YAML config file or packaged recipe name.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Images for the input-pipeline figures (skipped without it).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--images", type=click.IntRange(1), default=300, show_default=True,
              help="Images per pipeline pass (the data set repeated as needed).")
@click.option("--steps", type=click.IntRange(1), default=10, show_default=True,
              help="Timed training steps.")
@click.option("--no-train", is_flag=True, help="Only the input pipelines.")
def bench(config_path, data_dir, overrides, images, steps, no_train) -> None:
    """Print JSON throughput figures: input pipelines and training step time."""
    import json

    from boneage_keras.bench import run_bench
    from boneage_keras.config import load_config

    cfg = load_config(config_path, list(overrides))
    click.echo(json.dumps(run_bench(cfg, data_dir, images, steps, training=not no_train),
                          indent=2))


@cli.command()
@click.argument("variants", nargs=-1)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Labelled data to train on (as for train).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value of every variant (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              default="runs/benchmark", show_default=True,
              help="Folder for the runs, benchmark.json and report.html (rerun to "
                   "continue).")
@click.option("--resamples", type=click.IntRange(100), default=1000, show_default=True,
              help="Paired bootstrap resamples for each comparison.")
@_tta_option
def benchmark(variants, data_dir, overrides, out_dir, resamples, tta, mc_samples) -> None:
    """Compare recipes: train each VARIANT (on the first's split unless it changes the
    split), evaluate all on the same held-out images, bootstrap each against the first.

    A VARIANT is CONFIG (a file or recipe name) or NAME=CONFIG[,KEY=VALUE...]; without
    any: cpu-bench without and with the sex input."""
    _setup_logging(True)
    from boneage_keras.benchmark import run_benchmark
    from boneage_keras.summaries import benchmark_summary

    sets = list(overrides) + ([f"data.data_dir={data_dir}"] if data_dir else [])
    result = run_benchmark(list(variants) or None, sets, out_dir, tta=tta,
                           mc_samples=mc_samples, resamples=resamples,
                           verbose=1 if sys.stdout.isatty() else 2)
    click.echo(benchmark_summary(result, out_dir))


@cli.command()
@click.argument("source")
@click.option("--format", "formats", multiple=True, default=("all",), show_default=True,
              help="keras, savedmodel, onnx, triton (a Triton model repository) or all "
                   "(keras, savedmodel and onnx); repeatable.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to create with the exported files and model.json.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def export(source, formats, out_dir, overwrite) -> None:
    """Export RUN_DIR or MODEL.keras for deployment (.keras, SavedModel, ONNX)."""
    _setup_logging(False)
    from boneage_keras.export import export_model
    from boneage_keras.summaries import export_summary

    click.echo(export_summary(export_model(source, formats, out_dir, overwrite), out_dir))


@cli.command()
@click.option("--model", "model_paths", required=True, multiple=True,
              type=click.Path(), help="An export folder (model.onnx + model.json from "
                                      "`boneage export`); repeat for an ensemble.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; one other than loopback needs --token-file.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="A file whose first line is the bearer token callers must send.")
@click.option("--max-upload-mb", type=click.FloatRange(0.1), default=32.0,
              show_default=True, help="Largest request body accepted.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Most images per model run.")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=2.0, show_default=True,
              help="How long a model run waits for more images after the first.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="onnxruntime's intra-op threads per model run (more: idle ones spin, "
                   "taking cores from decoding).")
@click.option("--tta", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Test-time augmentation views per image (a request may ask another).")
@click.option("--queue-limit", type=click.IntRange(0), default=64, show_default=True,
              help="Images that may wait for the model; more are answered 503.")
@click.option("--wait-limit-s", type=click.FloatRange(0, min_open=True), default=30.0,
              show_default=True, help="An image that waited longer for the model: 503.")
@click.option("--stall-limit-s", type=click.FloatRange(0, min_open=True), default=30.0,
              show_default=True, help="An upload silent this long is dropped (408).")
def serve(model_paths, host, port, token_file, max_upload_mb, max_batch, max_wait_ms,
          threads, tta, queue_limit, wait_limit_s, stall_limit_s) -> None:
    """Serve exported models over HTTP: a REST API and a web page (onnxruntime only)."""
    _setup_logging(False)
    from boneage_keras.extras import require

    require("fastapi", "uvicorn", "python_multipart", "prometheus_client", "onnxruntime",
            purpose="boneage serve")
    from boneage_keras.serve import ServeOptions
    from boneage_keras.server import run_server

    run_server(list(model_paths), host, port, token_file,
               ServeOptions(max_upload_mb=max_upload_mb, max_batch=max_batch,
                            max_wait_ms=max_wait_ms, threads=threads,
                            tta=tta, queue_limit=queue_limit,
                            wait_limit_s=wait_limit_s, stall_limit_s=stall_limit_s))


if __name__ == "__main__":
    cli()
