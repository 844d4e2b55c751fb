"""Command line of boneage-keras: ``python cli.py COMMAND --help`` (or ``boneage``).

Each command parses its arguments, calls one library function and prints the result.
The Keras backend comes from KERAS_BACKEND (torch or tensorflow), e.g.

    KERAS_BACKEND=torch python cli.py train --config configs/default.yaml --data-dir DIR
"""

from __future__ import annotations

import logging
import sys

import click


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("boneage_keras").setLevel(logging.INFO)


class FriendlyGroup(click.Group):
    """Turns the package's input errors into one clear message and exit code 2."""

    def invoke(self, ctx: click.Context):
        from boneage_keras.errors import user_errors

        try:
            return super().invoke(ctx)
        except user_errors() as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=FriendlyGroup)
def cli() -> None:
    """Bone age (months) from hand radiographs with Keras 3."""


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              default="configs/default.yaml", show_default=True, help="YAML config file.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Data folder (Kaggle or flat layout); default ./data/rsna-bone-age, "
                   "else download with kagglehub.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set train.epochs=3 (repeatable).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue an interrupted run directory.")
def train(config_path: str, data_dir: str | None, overrides: tuple[str, ...],
          resume_dir: str | None) -> None:
    """Train a model and write a run directory (config, split, history, best.keras)."""
    _setup_logging(True)
    from boneage_keras.config import load_config
    from boneage_keras.train import train as run_training

    sets = list(overrides) + ([f"data.data_dir={data_dir}"] if data_dir else [])
    cfg = load_config(config_path, sets)
    result = run_training(cfg, resume_dir=resume_dir,
                          verbose=1 if sys.stdout.isatty() else 2)
    click.echo(f"run directory: {result.run_dir}")
    click.echo("best validation: " + ", ".join(f"{k}={v:.4f}" for k, v in result.best.items()))


if __name__ == "__main__":
    cli()
