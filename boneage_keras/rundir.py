"""The run directory: the contract between ``train`` and everything after it.

    runs/<name>/
      config.yaml   the resolved config          split.csv   id, boneage, male, split
      run.json      backend, devices, versions   history.csv one row per epoch
      best.keras    the best epoch by            last.keras  the latest epoch
                    train.monitor (no optimizer)             (no optimizer)
      curves.png    loss/MAE/tolerance accuracy  train.log   what was read, dropped, used
      backup/       the resumable state: weights with optimizer state, epoch, best
                    value so far and early stopping's wait (state.json)

Every file is written to a temporary name and renamed (``files.py``), so a kill at any
instant leaves the previous complete file. This module makes the folder, reads its
state, records where and how the run trained, and takes back what a failed start
wrote; the callbacks in ``callbacks.py`` write the rest epoch by epoch.
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import keras
import pandas as pd

from . import __version__
from .backend import backend_version, devices
from .config import Config
from .data import load_dataset, set_selection, split_table, subsample
from .distribute import Replicas
from .distribute import current as current_replicas
from .errors import BoneAgeError
from .files import make_writable_dir

log = logging.getLogger(__name__)
STATE = "state.json"
SETUP_FILES = ("config.yaml", "split.csv", "run.json", "train.log")


class RunDirError(BoneAgeError, RuntimeError):
    """A run directory cannot be created or resumed; the message says what to do."""


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The resumable state of a run (``backup/state.json``), or None before epoch 1."""
    path = Path(run_dir) / "backup" / STATE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def run_complete(state: dict[str, Any] | None) -> bool:
    """Whether a run's state says it trained all it was to (or stopped early)."""
    return state is not None and (state["finished"] or state["stopped_early"]
                                  or state["epoch"] >= state["epochs_planned"])


def is_setup_only(run_dir: Path) -> bool:
    """A folder left by a train that failed before its first epoch (reusable)."""
    return (read_state(run_dir) is None and not (run_dir / "history.csv").exists()
            and not (run_dir / "best.keras").exists())


def new_run_dir(cfg: Config, replicas: Replicas) -> Path:
    """The new run's folder, made by the chief (every process gets the chief's name)."""
    name = replicas.agree_text(cfg.train.run_name
                               or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(cfg.train.output_dir) / name
    if run_dir.exists() and not is_setup_only(run_dir):
        raise RunDirError(f"run directory {run_dir} already holds a trained run. Resume "
                          f"it with `boneage train --resume {run_dir}` or choose another "
                          "train.run_name.")
    if not replicas.chief:
        return run_dir
    try:
        make_writable_dir(run_dir)
    except OSError as err:
        raise RunDirError(f"cannot write the run directory {run_dir} ({err.strerror}); "
                          "set train.output_dir to a writable folder.") from None
    return run_dir


def remove_setup(run_dir: Path, keep_log: bool) -> None:
    """Before any epoch finished: take back the files this run wrote, so the same
    run_name can be used again (the log stays when it explains a failure)."""
    for name in SETUP_FILES:
        if name == "train.log" and keep_log:
            continue
        (run_dir / name).unlink(missing_ok=True)
    if not any(run_dir.iterdir()):
        run_dir.rmdir()


def make_split(cfg: Config) -> pd.DataFrame:
    """Load, clean, subsample and split the data (the run's split.csv is written later)."""
    table, _, _ = load_dataset(cfg.data.data_dir, strict=cfg.data.strict,
                               age_range=cfg.data.age_range, cache_dir=cfg.data.cache_dir)
    selection = None
    if cfg.data.selection_size:
        selection, table = set_selection(table, cfg.data.selection_size)
    table = subsample(table, cfg.data.max_images, cfg.train.seed)
    split = split_table(table, cfg.data.split, cfg.data.val_fraction,
                        cfg.data.test_fraction, cfg.train.seed,
                        cfg.data.calibration_fraction)
    if selection is not None:
        split = pd.concat([split, selection], ignore_index=True)
    counts = split["split"].value_counts().to_dict()
    log.info("split (%s, seed %d): %s", cfg.data.split, cfg.train.seed, counts)
    return split


def join_split(cfg: Config, split: pd.DataFrame, source: str) -> pd.DataFrame:
    """A split (``id``, ``split``) joined to the data's current rows and paths."""
    table, _, _ = load_dataset(cfg.data.data_dir, strict=cfg.data.strict,
                               age_range=cfg.data.age_range, cache_dir=cfg.data.cache_dir)
    merged = split[["id", "split"]].merge(table, on="id", how="left")
    missing = merged["path"].isna()
    if missing.any():
        raise RunDirError(f"{source}: {int(missing.sum())} id(s) not in the data (e.g. "
                          f"{merged.loc[missing, 'id'].iloc[0]}); point --data-dir "
                          "(--set data.data_dir=...) at the data the split was made from.")
    return merged


def saved_split(cfg: Config, run_dir: Path) -> pd.DataFrame:
    """The run's own split.csv joined to the data's current paths."""
    split_csv = run_dir / "split.csv"
    merged = join_split(cfg, pd.read_csv(split_csv, dtype={"id": str}), str(split_csv))
    log.info("reusing split from %s", split_csv)
    return merged


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def now() -> str:
    """The local time as ISO 8601, to the second."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def run_info(started: str, replicas: Replicas | None = None,
             **extra: Any) -> dict[str, Any]:
    """What run.json records: where and how the run trained."""
    replicas = replicas or current_replicas()
    return {"backend": keras.backend.backend(), "devices": replicas.devices or devices(),
            "replicas": replicas.replicas, "processes": replicas.processes,
            "distribute": replicas.describe(), "versions": {"boneage_keras": __version__,
                                          "keras": keras.__version__,
                                          keras.backend.backend(): backend_version(),
                                          "python": platform.python_version()},
            "git_commit": _git_commit(), "host": platform.node(), "started": started,
            **extra}


def attach_log_file(run_dir: Path) -> logging.Handler:
    """Copy the package's log lines into ``run_dir/train.log``."""
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("boneage_keras").addHandler(handler)
    return handler


def find_job_run(output_dir: str | Path, job_id: str) -> Path | None:
    """The run a torchrun job (``job_id``, the same across its restarts) started."""
    for info in Path(output_dir).glob("*/run.json"):
        try:
            if json.loads(info.read_text()).get("distribute", {}).get("job_id") == job_id:
                return info.parent
        except (OSError, ValueError):
            continue
    return None
