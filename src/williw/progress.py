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
    return not _disabled and os.environ.get("WILLIW_NO_PROGRESS", "") in ("", "0")


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

    with tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
              leave=False, dynamic_ncols=True) as bar:
        yield bar


def get_logger(name: str) -> logging.Logger:
    """The library's loggers live under ``williw``; they have no handler until an application adds one."""
    return logging.getLogger(name if name.startswith("williw") else f"williw.{name}")
