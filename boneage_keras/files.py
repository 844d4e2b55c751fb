"""Writing files so that a kill at any instant leaves the previous complete file.

Everything is written to a temporary name in the same folder and renamed over the
target (``os.replace`` is atomic on POSIX and Windows), so readers see either the old
file or the new one, never half of one.

    >>> write_text(run_dir / "config.yaml", text)
    >>> with replacing(run_dir / "best.keras") as tmp:   # tmp ends in .keras too
    ...     model.save(tmp)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import BoneAgeError

TMP_MARK = ".tmp-"


class OutputError(BoneAgeError):
    """An output file or folder cannot be written; the message names the flag."""


class NotTheWriter(RuntimeError):
    """A process that must not write (a distributed run's non-chief) tried to."""


_writes_forbidden: str | None = None


def forbid_writes(reason: str | None) -> None:
    """From now on every write through this module raises :class:`NotTheWriter` naming
    ``reason`` (e.g. "process 1 of 2: only the chief writes"); ``None`` allows again."""
    global _writes_forbidden
    _writes_forbidden = reason


def may_write() -> bool:
    return _writes_forbidden is None


def _check_writer(path: Path) -> None:
    if _writes_forbidden is not None:
        raise NotTheWriter(f"{path}: not written ({_writes_forbidden})")


def check_output_file(path: str | Path, flag: str) -> Path:
    """Before any work: ``path``'s folder exists and is writable (``flag`` names the
    option in the message)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a folder; give a file name, e.g. "
                          f"{path / 'predictions.csv'}.")
    if not folder.is_dir():
        raise OutputError(f"{flag} {path}: the folder {folder} does not exist; create it "
                          "or choose another path.")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{flag} {path}: the folder {folder} is not writable; choose "
                          "another path.")
    return path


def make_writable_dir(path: Path) -> None:
    """Make ``path`` (and its parents) and prove that a file can be written there;
    ``OSError`` if not (callers turn it into their own message)."""
    _check_writer(path)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def check_output_dir(path: str | Path, flag: str) -> Path:
    """Before any work: make ``path`` (and its parents) and check that it is writable."""
    path = Path(path)
    try:
        make_writable_dir(path)
    except OSError as err:
        raise OutputError(f"{flag} {path}: cannot write there ({err.strerror}); choose a "
                          "writable folder.") from None
    return path


def temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path`` that keeps its suffixes (``.weights.h5``,
    ``.keras``): some writers check them."""
    return path.with_name(f".{path.name.split('.')[0]}{TMP_MARK}{os.getpid()}"
                          f"{''.join(path.suffixes)}")


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path``, on failure it goes."""
    path = Path(path)
    _check_writer(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def finite_or_none(value: Any) -> Any:
    """NaN and infinities -> None, recursively: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: str | Path, value: Any) -> None:
    """Strict JSON (non-finite numbers written as null), atomically."""
    write_text(path, json.dumps(finite_or_none(value), indent=2, allow_nan=False) + "\n")


def write_csv(path: str | Path, table: Any, **kwargs: Any) -> None:
    """A pandas DataFrame as CSV, atomically."""
    with replacing(path) as tmp:
        table.to_csv(tmp, index=False, **kwargs)
