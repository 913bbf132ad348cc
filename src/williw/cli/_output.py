"""Output mode and the one table that turns exceptions into one-line messages.

Tracebacks only with ``WILLIW_DEBUG=1`` (huggingface_hub ``cli/_errors.py`` does the same with HF_DEBUG).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from williw.errors import WilliwError

EXIT_USER_ERROR = 2

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts; no bars.")


def set_json_mode(as_json: bool) -> None:
    """In --json mode progress bars are off, so stdout carries only the JSON object."""
    if as_json:
        from williw.progress import disable_progress_bars

        disable_progress_bars()


def emit(as_json: bool, result: dict[str, Any], human: Callable[[], str] | str) -> None:
    """Print ``result`` as JSON, or the human text."""
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(human() if callable(human) else human)


def table(rows: list[list[str]], headers: list[str]) -> str:
    """A plain aligned text table; numeric-looking columns are right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    right = [all(_numeric(r[i]) for r in rows) and bool(rows) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(row, widths, right,
                                                                                      strict=False)).rstrip()

    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def _numeric(cell: str) -> bool:
    head = str(cell).split(" ")[0].replace(",", "").replace("%", "").replace("x", "")
    try:
        float(head)
    except ValueError:
        return head in ("-", "")
    return True


def run_main(group: click.Group) -> None:
    """Run the click group; WilliwError (and a few builtins) become ``error: <line>`` and exit 2."""
    if not os.environ.get("WILLIW_DEBUG"):
        # One line per error and nothing else: third-party deprecation and user warnings stay off the terminal.
        import warnings

        warnings.simplefilter("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        # standalone_mode=False returns ctx.exit(n)'s code instead of exiting: pass it on.
        code = group.main(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:
        # `williw` alone: the help as click lays it out (squeezed into one error line it was unreadable)
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        # One line, like every other error, naming the command and where its help is (click prints three).
        where = exc.ctx.command_path if exc.ctx else "williw"
        message = _one_line(Exception(exc.format_message())).rstrip(".")
        click.echo(f"error: {where}: {message} (see '{where} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (WilliwError, OSError, KeyboardInterrupt) as exc:
        if os.environ.get("WILLIW_DEBUG"):
            raise
        if isinstance(exc, KeyboardInterrupt):
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        click.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(EXIT_USER_ERROR)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, WilliwError) and exc.filename:
        return f"'{exc.filename}': {exc.strerror}"
    return " ".join(str(exc).split("\n"))
