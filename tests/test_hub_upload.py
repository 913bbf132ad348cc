"""williw upload-metadata and fetch_metadata: the real client's create-repo, preupload and commit, against the
fake Hub."""
# ruff: noqa: F811

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_williw
from hubserver import FakeHub, fake_hub  # noqa: F401 - the fixture
from williw.errors import HubError, MetadataError
from williw.hub import fetch_metadata, metadata_path_in_repo
from williw.metadata import generate_metadata, save_metadata
from williw.pull import MetadataUploader, UploadConfig


@pytest.fixture
def metadata_file(tiny_llama: Path, tmp_path: Path) -> Path:
    path = tmp_path / "metadata.json"
    save_metadata(generate_metadata(tiny_llama, model_name="meta-llama/Tiny-1B"), path)
    return path


def test_upload_creates_the_repo_and_commits_the_file_intact(fake_hub: FakeHub, metadata_file: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add_token("hf_writer", write=True)
    monkeypatch.setenv("HF_TOKEN", "hf_writer")
    result = MetadataUploader().upload_metadata(UploadConfig(str(metadata_file), "me/williw-metadata"))

    repo = fake_hub.repos["me/williw-metadata"]
    assert fake_hub.created == ["me/williw-metadata"]
    assert result.path_in_repo == "models/meta-llama--Tiny-1B/metadata.json"
    assert repo.files == {result.path_in_repo: metadata_file.read_bytes()}
    assert result.commit_id == repo.sha and len(repo.commits) == 2
    assert result.url == f"{fake_hub.url}/me/williw-metadata/resolve/main/models/meta-llama--Tiny-1B/metadata.json"
    assert fake_hub.commit_payloads[0][0] == {"key": "header", "value": {
        "summary": "Add metadata of meta-llama/Tiny-1B", "description": ""}}

    assert fetch_metadata("me/williw-metadata", "meta-llama/Tiny-1B") == json.loads(metadata_file.read_text())

    again = MetadataUploader().upload_metadata(UploadConfig(str(metadata_file), "me/williw-metadata"))
    assert again.commit_id == result.commit_id and len(fake_hub.commit_payloads) == 1  # unchanged: no new commit


def test_invalid_metadata_is_refused_before_any_request(fake_hub: FakeHub, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add_token("hf_writer", write=True)
    monkeypatch.setenv("HF_TOKEN", "hf_writer")
    bad = tmp_path / "metadata.json"
    bad.write_text('{"model_name": 3}')
    with pytest.raises(MetadataError):
        MetadataUploader().upload_metadata(UploadConfig(str(bad), "me/meta"))
    assert fake_hub.requests == []


def test_upload_without_write_access_says_what_to_do(fake_hub: FakeHub, metadata_file: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ep = fake_hub.url
    with pytest.raises(HubError) as exc:
        MetadataUploader().upload_metadata(UploadConfig(str(metadata_file), "me/meta"))
    assert str(exc.value) == (f"uploading to 'me/meta' needs a token with write access: create one at "
                              f"{ep}/settings/tokens and set HF_TOKEN (or pass --token)")
    fake_hub.add_token("hf_reader")
    with pytest.raises(HubError) as exc:
        MetadataUploader().upload_metadata(UploadConfig(str(metadata_file), "me/meta", hf_token="hf_reader"))
    assert str(exc.value) == (f"{ep} refused access to 'me/meta' (403: You don't have the rights to create a model "
                              "under the namespace \"me\"); use a token with write access to it (set HF_TOKEN (or "
                              "pass --token))")
    assert fake_hub.created == []


@pytest.mark.parametrize(("name", "path"), [
    ("gpt2", "models/gpt2/metadata.json"),
    ("Qwen/Qwen2.5-0.5B", "models/Qwen--Qwen2.5-0.5B/metadata.json"),
    ("../../etc/passwd", "models/etc--passwd/metadata.json"),
    ("a/../b c", "models/a--..--b_c/metadata.json"),
])
def test_metadata_path_cannot_leave_models(name: str, path: str) -> None:
    assert metadata_path_in_repo(name) == path


def test_metadata_path_needs_letters() -> None:
    with pytest.raises(HubError) as exc:
        metadata_path_in_repo("../..")
    assert str(exc.value) == "model name '../..' has no letters or digits to name its metadata file"


def test_cli_upload_metadata_json(fake_hub: FakeHub, metadata_file: Path, tmp_path: Path) -> None:
    fake_hub.add_token("hf_writer", write=True)
    env = {"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "home"), "HF_TOKEN": ""}
    proc = run_williw("upload-metadata", str(metadata_file), "--repo", "me/meta", "--token", "hf_writer", "--json",
                      env=env, check=True)
    out = json.loads(proc.stdout)
    assert out == {"url": f"{fake_hub.url}/me/meta/resolve/main/models/meta-llama--Tiny-1B/metadata.json",
                   "commit_id": fake_hub.repos["me/meta"].sha,
                   "path_in_repo": "models/meta-llama--Tiny-1B/metadata.json"}
    assert fake_hub.repos["me/meta"].files[out["path_in_repo"]] == metadata_file.read_bytes()
    proc = run_williw("upload-metadata", str(metadata_file), "--repo", "me/meta", "--token", "hf_bogus", env=env)
    assert (proc.returncode, proc.stderr) == (2, f"error: {fake_hub.url} rejected the token from --token as invalid "
                                                 f"or expired: create one at {fake_hub.url}/settings/tokens and set "
                                                 "HF_TOKEN (or pass --token)\n")
