"""Progress bars and loggers. The library never prints; bars go to stderr and can be switched off.

Set ``WILLIW_NO_PROGRESS=1`` (the CLI does for ``--json``) to silence every bar, as huggingface_hub does with
``HF_HUB_DISABLE_PROGRESS_BARS``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_disabled = False


def disable_progress_bars() -> None:
    """Turn every progress bar of this process off."""
    global _disabled
    _disabled = True


def progress_enabled() -> bool:
    """Bars are drawn only on a terminal: in a log file or a pipe they are carriage-return noise."""
    import sys

    return (not _disabled and os.environ.get("WILLIW_NO_PROGRESS", "") in ("", "0")
            and sys.stderr is not None and sys.stderr.isatty())


class _NullBar:
    def update(self, n: float = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


@contextmanager
def progress_bar(total: float | None, desc: str, unit: str = "B") -> Iterator[Any]:
    """A tqdm bar (bytes scaled to KB/MB/GB) or a do-nothing bar when progress is off."""
    if not progress_enabled():
        yield _NullBar()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
              leave=False, dynamic_ncols=True) as bar:
        yield bar


def get_logger(name: str) -> logging.Logger:
    """The library's loggers live under ``williw``; they have no handler until an application adds one."""
    return logging.getLogger(name if name.startswith("williw") else f"williw.{name}")


def debug_enabled() -> bool:
    """``WILLIW_DEBUG=1``: tracebacks, and third-party warnings, logs and bars, reach the terminal."""
    return os.environ.get("WILLIW_DEBUG", "") not in ("", "0")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' and torch's warnings, log lines and progress bars ("Loading weights") while williw
    drives them, unless ``WILLIW_DEBUG=1``; their settings are restored afterwards. Imports transformers."""
    if debug_enabled():
        yield
        return
    import warnings

    from transformers.utils import logging as tf_logging

    verbosity, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()
