"""Atomic writes: the target appears whole, with its permissions from the start, and no temporary is left."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from williw.fsutil import atomic_writer, write_json


def test_secret_is_written_0600_and_nothing_else_is_left(tmp_path: Path) -> None:
    target = tmp_path / "node.json"

    write_json(target, {"node_token": "t"}, perms=0o600)

    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert json.loads(target.read_text()) == {"node_token": "t"}
    assert list(tmp_path.iterdir()) == [target]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_json(target, {"v": 1})

    with pytest.raises(RuntimeError), atomic_writer(target, "w") as f:
        f.write('{"v": 2')
        raise RuntimeError("interrupted")

    assert json.loads(target.read_text()) == {"v": 1}
    assert list(tmp_path.iterdir()) == [target]


def test_a_target_that_cannot_be_created_is_named_not_the_temporary() -> None:
    # /proc takes no new files (even for root): open() of the temporary beside the target fails.
    with pytest.raises(OSError) as e, atomic_writer("/proc/williw-test.json", "w") as f:
        f.write("{}")
    assert e.value.filename == "/proc/williw-test.json"
