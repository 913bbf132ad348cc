"""The layout holds: modules stay small, and imports flow one way (hub → checkpoint → structure → metadata → planner →
splitter → verifier), with the shells (worker, client, agent, workflow, CLI) on top and never imported below."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "williw"
MAX_LINES = 400

# Rank of each module (first dotted component under williw); a module may import only equal or lower ranks.
RANKS = {
    "errors": 0, "jsonio": 0, "units": 0, "progress": 0, "fsutil": 0, "precision": 0,
    "header": 1, "config": 1, "remote": 1, "hub": 1, "weightfiles": 1,
    "checkpoint": 2, "classify": 2, "remote_checkpoint": 2,
    "structure": 3, "seedformat": 3,
    "metadata": 4, "metadata_read": 4, "compute": 4, "memory": 4,
    "fleet": 5, "planner": 5,
    "shards": 6, "splitter": 6, "pull": 6, "gather": 6, "planviz": 6,
    "stages": 7, "hfmodel": 7, "verify": 7, "verify_report": 7, "verify_memory": 7, "decode_rules": 7,
    "quantize": 7, "devices": 1,
    # shells
    "runtime": 8, "node_stages": 8, "pipeline": 8,
    "serve": 8, "client": 8, "worker": 8, "generation": 9, "openai_api": 10,
    "agent": 9, "workflow": 9, "tinymodels": 9, "realmodels": 9,
    "demo": 10, "cli": 10,
}


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def _component(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_module_is_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines; split it (budget {MAX_LINES})"


@pytest.mark.parametrize("path", [p for p in _modules() if p.name != "__init__.py" or p.parent == SRC],
                         ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_one_way(path: Path) -> None:
    me = _component(path) if path.parent != SRC or path.name != "__init__.py" else "cli"
    if path == SRC / "__init__.py":
        me = "metadata"  # the package's public face re-exports the core, nothing above it
    assert me in RANKS, f"{path.relative_to(SRC)}: add '{me}' to RANKS in {Path(__file__).name}"
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] != "williw" or len(parts) < 2:
                continue
            other = parts[1]
            assert other in RANKS, f"{path.relative_to(SRC)} imports unknown williw.{other}"
            assert RANKS[other] <= RANKS[me], (f"{path.relative_to(SRC)} ({me}, rank {RANKS[me]}) imports "
                                               f"williw.{other} (rank {RANKS[other]}): data flows the other way")


def test_import_williw_is_light() -> None:
    code = ("import sys, williw, williw.planner, williw.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'sqlalchemy', 'uvicorn', "
            "'huggingface_hub', 'numpy', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
