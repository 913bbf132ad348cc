"""williw download and the Hub's error messages, through the real huggingface_hub client against the fake Hub."""
# ruff: noqa: F811

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from conftest import run_williw
from hubserver import FakeHub, fake_hub  # noqa: F401 - the fixture (tests name it as a parameter, F811)
from williw.errors import HubError
from williw.hub import DownloadConfig, ModelDownloader, choose_files, fetch_metadata

DUPLICATES = {"model.onnx": b"o" * 3000, "onnx/model.onnx": b"O" * 2000, "flax_model.msgpack": b"f" * 2500,
              "tf_model.h5": b"t" * 1500, "pytorch_model.bin": b"b" * 4000, "model.Q4_K_M.gguf": b"g" * 1000,
              "original/consolidated.pth": b"c" * 1200, "README.md": b"# tiny\n"}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_download_fetches_only_what_a_split_needs_byte_identical(fake_hub: FakeHub, tiny_llama: Path,
                                                                  tmp_path: Path) -> None:
    fake_hub.add_repo("org/llama", tiny_llama, files=DUPLICATES)
    result = ModelDownloader().download_model(DownloadConfig("org/llama", local_dir=str(tmp_path / "m")))

    assert result.files == ("config.json", "generation_config.json", "model.safetensors")
    assert _files(Path(result.local_path)) == _files(tiny_llama)
    served = fake_hub.repos["org/llama"].files
    assert {p for (_, p) in fake_hub.bytes_sent} == set(result.files)
    assert all(fake_hub.bytes_sent["org/llama", f] == len(served[f]) for f in result.files)
    assert result.total_size_mb == sum(len(served[f]) for f in result.files) / 2**20
    assert result.commit == fake_hub.repos["org/llama"].sha

    again = ModelDownloader().download_model(DownloadConfig("org/llama", local_dir=str(tmp_path / "m")))
    assert again.files == result.files
    assert all(fake_hub.bytes_sent["org/llama", f] == len(served[f]) for f in result.files)  # nothing refetched


def test_sharded_download_takes_the_index_files_only(fake_hub: FakeHub, tiny_llama_sharded: Path,
                                                     tmp_path: Path) -> None:
    fake_hub.add_repo("org/sharded", tiny_llama_sharded, files={"consolidated.safetensors": b"x" * 5000})
    result = ModelDownloader().download_model(DownloadConfig("org/sharded", cache_dir=str(tmp_path / "cache")))
    index = json.loads((tiny_llama_sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert result.files == tuple(sorted(["config.json", "generation_config.json", "model.safetensors.index.json",
                                         *shards]))
    assert _files(Path(result.local_path)) == _files(tiny_llama_sharded)
    assert fake_hub.bytes_sent["org/sharded", "consolidated.safetensors"] == 0


def test_bin_only_when_there_is_no_safetensors() -> None:
    files = ["config.json", "pytorch_model.bin", "flax_model.msgpack", "tf_model.h5", "training_args.bin",
             "model.onnx", "tokenizer.json", "merges.txt", "vocab.json", "coreml/model.mlpackage"]
    assert choose_files(files) == ["config.json", "merges.txt", "pytorch_model.bin", "tokenizer.json", "vocab.json"]
    sharded = ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
               "pytorch_model-00002-of-00002.bin", "pytorch_model.bin"]
    assert choose_files(sharded, ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]) == \
        sorted(sharded[:4])
    assert choose_files(files + ["model.safetensors"]) == ["config.json", "merges.txt", "model.safetensors",
                                                          "tokenizer.json", "vocab.json"]


def test_a_cut_download_resumes_from_the_last_byte_received(fake_hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE  # the client keeps whole chunks of this size

    weights = bytes(range(256)) * ((DOWNLOAD_CHUNK_SIZE + (2 << 20)) // 256)
    fake_hub.add_repo("org/big", files={"config.json": b"{}", "model.safetensors": weights})
    cut = DOWNLOAD_CHUNK_SIZE + (1 << 20)
    fake_hub.fail("/model.safetensors", cut_after=cut)
    result = ModelDownloader().download_model(DownloadConfig("org/big", local_dir=str(tmp_path / "m")))
    assert (Path(result.local_path) / "model.safetensors").read_bytes() == weights
    assert fake_hub.ranges("/model.safetensors") == [None, f"bytes={DOWNLOAD_CHUNK_SIZE}-"]
    assert fake_hub.bytes_sent["org/big", "model.safetensors"] == len(weights) + cut - DOWNLOAD_CHUNK_SIZE


def test_a_local_folder_is_used_as_is(fake_hub: FakeHub, tiny_llama: Path) -> None:
    result = ModelDownloader().download_model(DownloadConfig(str(tiny_llama)))
    assert result.local_path == str(tiny_llama.resolve()) and result.commit is None
    assert result.files == ("config.json", "generation_config.json", "model.safetensors")
    assert fake_hub.requests == []


def _err(repo: str, **kw) -> str:
    with pytest.raises(HubError) as exc:
        ModelDownloader(kw.pop("token", None)).download_model(DownloadConfig(repo, cache_dir=kw.pop("cache")))
    return str(exc.value)


def test_each_failure_is_one_line_saying_what_to_do(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ep, cache = fake_hub.url, str(tmp_path / "c")
    fake_hub.add_repo("org/private", tiny_llama, private=True)
    fake_hub.add_repo("org/gated", tiny_llama, gated=True)
    fake_hub.add_token("hf_reader", gated_access=False)
    fake_hub.add_token("hf_member")
    assert _err("org/missing", cache=cache) == (
        f"model 'org/missing' was not found on {ep}: check the name, or if it is private set HF_TOKEN (or pass "
        "--token) to a token that can read it")
    assert _err("org/private", cache=cache) == (
        f"model 'org/private' was not found on {ep}: check the name, or if it is private set HF_TOKEN (or pass "
        "--token) to a token that can read it")
    assert _err("org/missing", cache=cache, token="hf_reader") == (
        f"model 'org/missing' was not found on {ep}, or the token from --token cannot read it: check the name and "
        "the token's access")
    assert _err("org/gated", cache=cache) == (
        f"'org/gated' is a gated model: accept its conditions at {ep}/org/gated, then set HF_TOKEN (or pass "
        "--token) to a token of that account")
    monkeypatch.setenv("HF_TOKEN", "hf_reader")
    assert _err("org/gated", cache=cache) == (
        f"the token from HF_TOKEN has no access to the gated model 'org/gated': request access at {ep}/org/gated, "
        "or use a token of an account that has it")
    monkeypatch.setenv("HF_TOKEN", "hf_expired")
    assert _err("org/gated", cache=cache) == (
        f"{ep} rejected the token from HF_TOKEN as invalid or expired: create one at {ep}/settings/tokens and set "
        "HF_TOKEN (or pass --token)")
    monkeypatch.setenv("HF_TOKEN", "hf_member")
    assert ModelDownloader().download_model(DownloadConfig("org/private", cache_dir=cache)).files[-1] == \
        "model.safetensors"
    assert ModelDownloader().download_model(DownloadConfig("org/gated", cache_dir=cache)).files[-1] == \
        "model.safetensors"
    with pytest.raises(HubError) as exc:
        ModelDownloader().download_model(DownloadConfig("org/gated", cache_dir=cache, revision="v9"))
    assert str(exc.value) == ("model 'org/gated' has no revision 'v9': check --revision (a branch, tag or commit "
                              "id)")
    with pytest.raises(HubError) as exc:
        fetch_metadata("org/gated", "org/absent")
    assert str(exc.value) == ("model 'org/gated' has no file 'models/org--absent/metadata.json' at revision "
                              "'main'")
    assert _err("not a repo/../x", cache=cache) == \
        "'not a repo/../x' is neither a folder nor a Hugging Face repo id (like 'org/model')"


def test_an_unreachable_hub_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubError) as exc:
        ModelDownloader().download_model(DownloadConfig("org/llama", cache_dir=str(tmp_path)))
    assert str(exc.value).startswith(f"cannot reach http://127.0.0.1:{port} (")
    assert str(exc.value).endswith("): check the network connection and HF_ENDPOINT, then retry")


@pytest.mark.parametrize(("repo", "token", "status"), [("org/private", None, 401), ("org/gated", "hf_reader", 403),
                                                       ("org/missing", "hf_reader", 404)])
def test_cli_prints_the_message_and_exits_2(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path, repo: str,
                                            token: str | None, status: int) -> None:
    fake_hub.add_repo("org/private", tiny_llama, private=True)
    fake_hub.add_repo("org/gated", tiny_llama, gated=True)
    fake_hub.add_token("hf_reader", gated_access=False)
    env = {"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "home"), "HF_TOKEN": token or ""}
    proc = run_williw("download", repo, "--local-dir", str(tmp_path / "m"), env=env)
    ep = fake_hub.url
    expected = {
        401: f"model 'org/private' was not found on {ep}: check the name, or if it is private set HF_TOKEN (or "
             "pass --token) to a token that can read it",
        403: f"the token from HF_TOKEN has no access to the gated model 'org/gated': request access at "
             f"{ep}/org/gated, or use a token of an account that has it",
        404: f"model 'org/missing' was not found on {ep}, or the token from HF_TOKEN cannot read it: check the name "
             "and the token's access",
    }[status]
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, f"error: {expected}\n", "")
    assert set(fake_hub.errors) == {status}


def test_cli_download_json(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    fake_hub.add_repo("org/llama", tiny_llama, files=DUPLICATES)
    env = {"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "home"), "HF_TOKEN": ""}
    proc = run_williw("download", "org/llama", "--local-dir", str(tmp_path / "m"), "--json", env=env, check=True)
    out = json.loads(proc.stdout)
    assert out["files"] == ["config.json", "generation_config.json", "model.safetensors"]
    assert out["local_path"] == str((tmp_path / "m").resolve())
    assert _files(tmp_path / "m") == _files(tiny_llama)


def test_weights_in_a_subfolder_are_named(fake_hub: FakeHub, tiny_bert: Path) -> None:
    files = {f"0_Transformer/{p.name}": p.read_bytes() for p in tiny_bert.iterdir() if p.is_file()}
    fake_hub.add_repo("org/st", files={**files, "modules.json": b"[]"})

    with pytest.raises(HubError) as err:
        ModelDownloader().download_model(DownloadConfig("org/st"))

    assert str(err.value) == ("model 'org/st' has no safetensors or PyTorch weights at its top level (3 files); its "
                              "weights are in '0_Transformer/' (a sentence-transformers layout?), which williw does "
                              "not read from a repo: download that folder and give its path")


def test_mistral_consolidated_copy_is_not_downloaded() -> None:
    files = ["config.json", "params.json", "model.safetensors", "consolidated.safetensors", "tokenizer.json"]
    assert choose_files(files) == ["config.json", "model.safetensors", "tokenizer.json"]
