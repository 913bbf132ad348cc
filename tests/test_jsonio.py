"""The one strict JSON reader: every file williw reads refuses deep nesting, NaN/Infinity, invalid UTF-8 and
huge integers with one line naming the file, and the CLI exits 2 without a traceback (issue 16)."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from williw.errors import PlanError
from williw.jsonio import JsonInputError, dumps_strict, parse, read_file

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(("text", "message"), [
    (DEEP, "not valid JSON (nested deeper than 64 levels)"),
    ("[" * 65 + "]" * 65, "not valid JSON (nested deeper than 64 levels)"),
    ('{"a": NaN}', "not valid JSON (NaN is not a number; only finite numbers are allowed)"),
    ("[Infinity]", "not valid JSON (Infinity is not a number; only finite numbers are allowed)"),
    ("[1e400]", "not valid JSON (a number overflows a 64-bit float; only finite numbers are allowed)"),
    (b'"\xc3\x28"', "not UTF-8 (byte 1 is 0xc3)"),
    ("{", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ('[{"node_id": "a", "x": 1, "node_id": "b"}]', 'not valid JSON (the key "node_id" appears twice in one object)'),
])
def test_parse_refuses_with_one_line(text, message):
    with pytest.raises(JsonInputError) as exc:
        parse(text)
    assert str(exc.value) == message


def test_parse_accepts_64_levels_and_finite_numbers():
    assert parse("[" * 64 + "]" * 64) is not None
    assert parse('{"x": [1.5e308, -2, 0]}') == {"x": [1.5e308, -2, 0]}


def test_read_file_names_the_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(DEEP)
    with pytest.raises(PlanError) as exc:
        read_file(f, PlanError, "no such plan file")
    assert str(exc.value) == f"'{f}': not valid JSON (nested deeper than 64 levels)"


def test_dumps_strict_refuses_nan():
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        dumps_strict({"a": float("nan")})


def _deep_header_model(src, dst):
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    f.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    return f


def test_cli_deep_files_are_one_line_exit_2(williw, tiny_llama, tmp_path):
    model = tmp_path / "m"
    f = _deep_header_model(tiny_llama, model)
    r = williw("metadata", str(model))
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"error: Failed to parse safetensors header for '{f}': the header is not valid JSON "
                        "(nested deeper than 64 levels)\n")
    config = tmp_path / "c"
    shutil.copytree(tiny_llama, config)
    (config / "config.json").write_text(DEEP)
    r = williw("metadata", str(config))
    assert (r.returncode, r.stderr) == (
        2, f"error: '{config / 'config.json'}': config.json is not valid JSON (nested deeper than 64 levels)\n")
    meta, plan, nodes = tmp_path / "meta.json", tmp_path / "plan.json", tmp_path / "nodes.json"
    for path in (meta, plan, nodes):
        path.write_text(DEEP)
    r = williw("validate", str(meta), str(plan))
    assert (r.returncode, r.stderr) == (2, f"error: '{meta}': not valid JSON (nested deeper than 64 levels)\n")
    williw("metadata", str(tiny_llama), "-o", str(meta), check=True)
    r = williw("validate", str(meta), str(plan))
    assert (r.returncode, r.stderr) == (2, f"error: '{plan}': not valid JSON (nested deeper than 64 levels)\n")
    r = williw("plan", str(meta), "--nodes", str(nodes))
    assert (r.returncode, r.stderr) == (2, f"error: '{nodes}': not valid JSON (nested deeper than 64 levels)\n")
    r = williw("show-plan", str(plan), "--svg", str(tmp_path / "p.svg"))
    assert (r.returncode, r.stderr) == (2, f"error: '{plan}': not valid JSON (nested deeper than 64 levels)\n")
    nodes.write_text(json.dumps([{"node_id": "a", "compute_tflops": 1e308, "memory_gb": 1}]))
    r = williw("plan", str(meta), "--nodes", str(nodes))
    assert (r.returncode, r.stderr) == (2, f"error: '{nodes}': entry 0 (node 'a'): field 'compute_tflops' must be "
                                           "a finite number in [1e-6, 1e9], got 1e+308\n")
