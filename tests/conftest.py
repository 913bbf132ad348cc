"""Fixtures: small real models, built once per session, and helpers to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WILLIW_NO_PROGRESS", "1")

from williw import tinymodels as factories

# The fake Hub (tests/hubserver.py) as a fixture every test can ask for by name: `fake_hub`.
pytest_plugins = ["hubserver"]

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def _cached(models_dir: Path, name: str, build) -> Path:
    path = models_dir / name
    if not path.exists():
        build(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(models_dir: Path) -> Path:
    """4 blocks, GQA (4 heads, 2 KV heads), untied, float32, one model.safetensors."""
    return _cached(models_dir, "llama", lambda p: factories.build_causal_lm(p, "llama"))


@pytest.fixture(scope="session")
def tiny_llama_sharded(models_dir: Path) -> Path:
    """The same weights as tiny_llama, in several safetensors shards with an index."""
    return _cached(models_dir, "llama-sharded",
                   lambda p: factories.build_causal_lm(p, "llama", shard_bytes=200_000))


@pytest.fixture(scope="session")
def tiny_llama_tied_bf16(models_dir: Path) -> Path:
    return _cached(models_dir, "llama-tied-bf16",
                   lambda p: factories.build_causal_lm(p, "llama", tie=True, dtype="bfloat16"))


@pytest.fixture(scope="session")
def tiny_gpt2(models_dir: Path) -> Path:
    return _cached(models_dir, "gpt2", lambda p: factories.build_causal_lm(p, "gpt2"))


@pytest.fixture(scope="session")
def tiny_bert(models_dir: Path) -> Path:
    return _cached(models_dir, "bert", factories.build_bert)


@pytest.fixture(scope="session")
def tiny_llama_bin(models_dir: Path, tiny_llama: Path) -> Path:
    return _cached(models_dir, "llama-bin", lambda p: factories.build_bin_copy(tiny_llama, p))


@pytest.fixture(scope="session")
def tiny_llama_bin_sharded(models_dir: Path, tiny_llama: Path) -> Path:
    return _cached(models_dir, "llama-bin-sharded", lambda p: factories.build_bin_copy(tiny_llama, p, sharded=True))


def run_williw(*args: str, check: bool = False, env: dict[str, str] | None = None,
               cwd: str | Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the installed ``williw`` console script as a user would."""
    proc = subprocess.run([str(VENV_BIN / "williw"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WILLIW_NO_PROGRESS": "1", **(env or {})}, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"williw {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def williw():
    return run_williw
