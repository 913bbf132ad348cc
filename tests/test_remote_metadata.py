"""Metadata straight from the Hub (issue 18): config and headers read by HTTP range through the real
huggingface_hub client and the fake Hub, equal field for field to the same folder's, without a weight byte."""
# ruff: noqa: F811

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run_williw
from hubserver import FakeHub, fake_hub  # noqa: F401 - the fixture
from williw.errors import HubError
from williw.header import FIRST_RANGE_BYTES
from williw.metadata import generate_metadata
from williw.remote_checkpoint import open_remote_checkpoint
from williw.serve import ModelServer


def _header_size(path: Path) -> int:
    """8 + the header's length, read without williw."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _local(folder: Path, name: str) -> dict:
    return generate_metadata(folder, model_name=name).to_dict()


@pytest.fixture(scope="module")
def with_copies(tmp_path_factory: pytest.TempPathFactory, tiny_llama_sharded: Path, tiny_llama: Path) -> Path:
    """Shards with an index, plus what the file rule leaves out: Mistral's consolidated copy and an original/ copy."""
    folder = tmp_path_factory.mktemp("copies") / "model"
    shutil.copytree(tiny_llama_sharded, folder)
    shutil.copy(tiny_llama / "model.safetensors", folder / "consolidated.safetensors")
    (folder / "original").mkdir()
    shutil.copy(tiny_llama / "model.safetensors", folder / "original" / "model.safetensors")
    return folder


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_llama_sharded", "tiny_llama_tied_bf16", "tiny_gpt2",
                                   "with_copies"])
def test_remote_metadata_equals_the_folder_and_reads_only_headers(fake_hub: FakeHub, model: str,
                                                                  request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(model)
    repo = fake_hub.add_repo("org/m", folder)
    fetched = open_remote_checkpoint("org/m")
    remote = generate_metadata(fetched.checkpoint).to_dict()

    assert remote.pop("commit") == repo.sha
    local = _local(folder, "org/m")
    assert local.pop("commit") is None
    assert remote == local  # every field, every tensor

    chosen = list(fetched.checkpoint.files)
    headers = {f: _header_size(folder / f) for f in chosen}
    assert fetched.header_bytes == sum(headers.values())
    for f in chosen:  # the first 100,000 bytes, or the whole header if longer, or the whole file if shorter
        size = (folder / f).stat().st_size
        assert fake_hub.sent("org/m", f) == min(size, max(FIRST_RANGE_BYTES, headers[f])), f
    weights = fake_hub.sent("org/m", ".safetensors")
    assert weights <= sum(headers.values()) + FIRST_RANGE_BYTES * len(chosen)
    ignored = set(remote["ignored_files"])
    assert all(fake_hub.sent("org/m", f) == 0 for f in ignored)
    if model == "with_copies":
        assert ignored == {"consolidated.safetensors", "original/model.safetensors"}


def test_a_header_longer_than_the_first_range_takes_exactly_one_more_request(fake_hub: FakeHub,
                                                                             tmp_path: Path) -> None:
    folder = tmp_path / "long"
    folder.mkdir()
    tensors = {f"model.layers.{i}.mlp.down_proj.weight_with_a_long_name": np.full((2, 2), i, np.float32)
               for i in range(1500)}
    save_file(tensors, str(folder / "model.safetensors"))
    n = _header_size(folder / "model.safetensors")
    assert n > FIRST_RANGE_BYTES

    fake_hub.add_repo("org/long", folder)
    fetched = open_remote_checkpoint("org/long")
    assert generate_metadata(fetched.checkpoint).to_dict() | {"commit": None} == _local(folder, "org/long")
    assert fake_hub.ranges("/model.safetensors") == [f"bytes=0-{FIRST_RANGE_BYTES - 1}",
                                                     f"bytes={FIRST_RANGE_BYTES}-{n - 1}"]
    assert fake_hub.sent("org/long", "model.safetensors") == n  # the header, and not one byte of weights


def test_headers_of_many_shards_are_read_concurrently_pinned_to_the_commit(fake_hub: FakeHub,
                                                                           tiny_llama_sharded: Path) -> None:
    repo = fake_hub.add_repo("org/m", tiny_llama_sharded)
    fetched = open_remote_checkpoint("org/m", revision="main")
    shards = sorted(fetched.checkpoint.files)
    assert len(shards) > 1
    resolved = [p for m, p, _ in fake_hub.requests if "/resolve/" in p]
    assert resolved and all(f"/resolve/{repo.sha}/" in p for p in resolved)
    assert sorted(p.rsplit("/", 1)[1] for p in resolved if p.endswith(".safetensors")) == shards
    # Besides the Hub API's repo-info and tree calls: config, index, one range per shard.
    assert fetched.requests == 2 + len(shards)


def test_metadata_of_a_serve_model_url_equals_the_folder(tiny_llama_sharded: Path) -> None:
    server = ModelServer(tiny_llama_sharded).start()
    try:
        fetched = open_remote_checkpoint(server.url)
        remote = generate_metadata(fetched.checkpoint, model_name="m").to_dict()
        sent = dict(server.bytes_sent)
    finally:
        server.shutdown()
        server.server_close()
    assert remote == _local(tiny_llama_sharded, "m")
    for f in fetched.checkpoint.files:
        assert sent[f] == min((tiny_llama_sharded / f).stat().st_size, FIRST_RANGE_BYTES)


def test_cli_metadata_of_a_repo_id(fake_hub: FakeHub, tiny_llama_sharded: Path, tmp_path: Path) -> None:
    repo = fake_hub.add_repo("org/m", tiny_llama_sharded)
    out = tmp_path / "meta.json"
    proc = run_williw("metadata", "org/m", "-o", str(out), "--json", env={"HF_ENDPOINT": fake_hub.url},
                      check=True)
    summary = json.loads(proc.stdout)
    assert summary["commit"] == repo.sha and summary["requests"] == 6 and proc.stderr == ""
    written = json.loads(out.read_text())
    assert written.pop("commit") == repo.sha
    local = json.loads(json.dumps(_local(tiny_llama_sharded, "org/m")))
    local.pop("commit")
    assert written == local
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing of the weights came to this machine
    assert fake_hub.sent("org/m", ".safetensors") == sum(
        min(p.stat().st_size, FIRST_RANGE_BYTES) for p in tiny_llama_sharded.glob("*.safetensors"))


def test_each_hub_problem_is_one_line_saying_what_to_do(fake_hub: FakeHub, tiny_llama: Path) -> None:
    ep = fake_hub.url
    fake_hub.add_repo("org/gated", tiny_llama, gated=True)
    fake_hub.add_repo("org/private", tiny_llama, private=True)
    fake_hub.add_token("hf_good", gated_access=False)
    cases = {
        ("org/absent", None): f"model 'org/absent' was not found on {ep}: check the name, or if it is private set "
                              "HF_TOKEN (or pass --token) to a token that can read it",
        ("org/private", None): f"model 'org/private' was not found on {ep}: check the name, or if it is private "
                               "set HF_TOKEN (or pass --token) to a token that can read it",
        ("org/gated", None): f"'org/gated' is a gated model: accept its conditions at {ep}/org/gated, then set "
                             "HF_TOKEN (or pass --token) to a token of that account",
        ("org/gated", "hf_good"): "the token from --token has no access to the gated model 'org/gated': request "
                                  f"access at {ep}/org/gated, or use a token of an account that has it",
        ("org/gated", "hf_bad"): f"{ep} rejected the token from --token as invalid or expired: create one at "
                                 f"{ep}/settings/tokens and set HF_TOKEN (or pass --token)",
    }
    for (repo, token), message in cases.items():
        with pytest.raises(HubError) as exc:
            open_remote_checkpoint(repo, token=token)
        assert str(exc.value) == message, (repo, token)
    assert fake_hub.sent("org/gated") == 0 and fake_hub.sent("org/private") == 0


def test_a_repo_of_pickles_says_how_to_read_it(fake_hub: FakeHub, tiny_llama_bin: Path, tmp_path: Path) -> None:
    fake_hub.add_repo("org/bin", tiny_llama_bin)
    proc = run_williw("metadata", "org/bin", env={"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: 'org/bin' has only PyTorch pickle weights (pytorch_model.bin), whose tensor "
                           "layout cannot be read without downloading them: run williw metadata org/bin --download "
                           "(fetches the weights, then reads them), or convert the repo to safetensors\n")
    assert fake_hub.sent("org/bin", ".bin") == 0

    out = tmp_path / "meta.json"
    run_williw("metadata", "org/bin", "--download", "-o", str(out), "--json",
               env={"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "hf")}, check=True)
    written = json.loads(out.read_text())
    assert written.pop("commit") == fake_hub.repos["org/bin"].sha
    local = json.loads(json.dumps(_local(tiny_llama_bin, "org/bin")))
    local.pop("commit")
    assert written == local


def test_remote_metadata_imports_neither_torch_nor_transformers(fake_hub: FakeHub, tiny_llama: Path,
                                                                tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    fake_hub.add_repo("org/m", tiny_llama)
    code = ("import sys\nfrom williw.cli import cli\n"
            "try:\n    cli(['metadata', 'org/m', '--json', '-o', sys.argv[1]])\n"
            "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.json")], capture_output=True, text=True,
                         env={**os.environ, "HF_ENDPOINT": fake_hub.url}, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert json.loads((tmp_path / "m.json").read_text())["commit"] == fake_hub.repos["org/m"].sha
