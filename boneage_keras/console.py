"""What the package prints while it works: progress, and no native start-up noise.

* :func:`progress` is Keras' progress bar on a terminal, and plain lines (every 10%,
  no colour codes) when the output goes to a file or a pipe.
* :func:`native_stderr_silenced` hides what TensorFlow's C++ core writes to the
  process's stderr while it starts (oneDNN, CUDA driver and cuInit lines, which its
  ``TF_CPP_MIN_LOG_LEVEL`` no longer controls); ``BONEAGE_VERBOSE=1`` (``boneage
  --verbose``) shows them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

VERBOSE_ENV = "BONEAGE_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block (unless verbose)."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class PlainProgress:
    """A progress report for logs: one line per 10% to stderr, no control codes."""

    def __init__(self, total: int, unit_name: str = "step") -> None:
        self.total, self.unit, self.done, self.next_tenth = total, unit_name, 0, 1

    def update(self, current: int) -> None:
        self.done = current
        while self.total and self.done * 10 >= self.next_tenth * self.total \
                and self.next_tenth <= 10:
            print(f"{self.done}/{self.total} {self.unit}s ({self.next_tenth * 10}%)",
                  file=sys.stderr, flush=True)
            self.next_tenth += 1

    def add(self, n: int) -> None:
        self.update(self.done + n)


def progress(total: int, unit_name: str = "step") -> Any:
    """A bar with ``update(current)`` and ``add(n)``: Keras' on a terminal, else plain."""
    if sys.stdout.isatty():
        import keras

        return keras.utils.Progbar(total, unit_name=unit_name)
    return PlainProgress(total, unit_name)
