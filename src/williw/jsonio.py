"""The one strict JSON reader and writer: every file and every HTTP body williw reads goes through `loads`.

Python's ``json`` accepts ``NaN`` and ``Infinity`` (not JSON, RFC 8259 §6), nests until the interpreter's
recursion limit (then raises ``RecursionError``, not ``ValueError``), and refuses integers of more than 4,300
digits with a bare ``ValueError`` (CPython's ``sys.set_int_max_str_digits``, CVE-2020-10735). Each of those
escaped the callers' ``except JSONDecodeError`` as a traceback or an HTTP 500. Here every way a text can fail
becomes one ``error`` whose message names the file or field:

* nesting deeper than `MAX_DEPTH` (64) levels: no williw format nests more than 6 levels (a plan's
  ``@plan.excluded[i].reason``), and 64 keeps far below the ~1,000 levels at which pickling (the worker's planning
  process) or a recursive walk fails;
* ``NaN``, ``Infinity``, ``-Infinity``;
* integers over 4,300 digits, invalid UTF-8, and syntax errors.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

MAX_DEPTH = 64
INT64_MAX = 2**63 - 1


class JsonInputError(ValueError):
    """A text is not strict JSON within the limits; one line starting "not ...", without the source's name."""


def _refuse_constant(name: str) -> Any:
    raise JsonInputError(f"not valid JSON ({name} is not a number; only finite numbers are allowed)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 8259 leaves a repeated name's meaning open; json.loads keeps the last, so {"node_id": "a", "node_id": "b"}
    # was node b without a word.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        key = next(k for i, (k, _) in enumerate(pairs) if any(k == j for j, _ in pairs[:i]))  # only when one repeats
        raise JsonInputError(f"not valid JSON (the key {json.dumps(key)[:80]} appears twice in one object)")
    return obj


def depth_ok(obj: Any, limit: int) -> bool:
    """Whether ``obj`` (lists and dicts) nests at most ``limit`` levels (``[]`` is 1); iterative, no recursion.

    A container reached again no deeper than before is not walked again: YAML aliases share one list among many
    parents (9 aliases of 9 aliases, 8 times over, are 43 million items from a 400-byte file).
    """
    deepest: dict[int, int] = {}
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return False
        if deepest.get(id(value), 0) >= depth:
            continue
        deepest[id(value)] = depth
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return True


def parse(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse strict JSON.

    Args:
        text: the document; bytes must be UTF-8.
        max_depth: most levels of arrays/objects (``[]`` is 1 level).

    Returns:
        The parsed value (dict, list, str, int, float, bool or None); every float is finite, and no object
        repeats a key.

    Raises:
        JsonInputError: one line saying what is wrong (position included for syntax errors).
    """
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonInputError(f"not UTF-8 (byte {exc.start:,} is 0x{exc.object[exc.start]:02x})") from None
    try:
        obj = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except JsonInputError:
        raise
    except json.JSONDecodeError as exc:
        raise JsonInputError(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise JsonInputError(f"not valid JSON (nested deeper than {max_depth} levels)") from None
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise JsonInputError(f"not valid JSON ({' '.join(str(exc).split())})"[:200]) from None
    if not depth_ok(obj, max_depth):
        raise JsonInputError(f"not valid JSON (nested deeper than {max_depth} levels)")
    # Decimal exponents such as 1e999 parse to inf without passing through parse_constant.
    if has_nonfinite(obj):
        raise JsonInputError("not valid JSON (a number overflows a 64-bit float; only finite numbers are allowed)")
    return obj


def has_nonfinite(obj: Any) -> bool:
    """Whether ``obj`` (dicts, lists and scalars, as JSON parses them) holds an inf or NaN anywhere."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                return True
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def loads(text: str | bytes, where: str, error: type[Exception]) -> Any:
    """`parse`, raising ``error("<where>: <what>")``."""
    try:
        return parse(text)
    except JsonInputError as exc:
        raise error(f"{where}: {exc}") from None


def read_file(path: str | os.PathLike[str], error: type[Exception], missing: str) -> Any:
    """Read a JSON file strictly; each way it fails is one ``error`` naming the file.

    Args:
        path: the file.
        error: the caller's exception family (MetadataError, PlanError, ...).
        missing: what to say when the file does not exist, e.g. "no such plan file".
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"'{path}': {missing}") from None
    except IsADirectoryError:
        raise error(f"'{path}': is a folder, expected a JSON file") from None
    return loads(raw, f"'{path}'", error)


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` refusing NaN/Infinity (``ValueError``), so nothing williw writes is JSON it would refuse."""
    return json.dumps(obj, allow_nan=False, **kwargs)
