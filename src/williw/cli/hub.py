"""``williw download``, ``williw upload-metadata`` and ``williw pull``: the Hugging Face Hub side."""

from __future__ import annotations

import click

from williw.cli import cli
from williw.cli._output import emit, json_option, set_json_mode, table

token_option = click.option("--token", help="Hub token (default: HF_TOKEN, then the saved login).")


@cli.command("download")
@click.argument("model")
@click.option("--revision", help="Branch, tag or commit (default: main).")
@click.option("--local-dir", type=click.Path(file_okay=False), help="Put the files here instead of the HF cache.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="The Hugging Face cache folder to use.")
@token_option
@json_option
def download_cmd(model: str, revision: str | None, local_dir: str | None, cache_dir: str | None,
                 token: str | None, as_json: bool) -> None:
    """Download what a split needs of MODEL (a Hub repo id): config, tokenizer and one copy of the weights.

    A folder path is used as it is. The Hub address comes from HF_ENDPOINT.
    """
    set_json_mode(as_json)
    from williw.progress import progress_enabled

    if not progress_enabled():
        import os

        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from williw.hub import DownloadConfig, ModelDownloader
    from williw.units import format_bytes

    result = ModelDownloader(token).download_model(
        DownloadConfig(model_name=model, cache_dir=cache_dir, revision=revision, local_dir=local_dir))
    out = {"local_path": result.local_path, "files": list(result.files),
           "total_size_mb": round(result.total_size_mb, 3), "commit": result.commit}
    emit(as_json, out, lambda: f"{result.local_path}\n{len(result.files)} files, "
                               f"{format_bytes(result.total_size_mb * 2**20)}"
                               + (f" at commit {result.commit[:12]}" if result.commit else ""))


@cli.command("upload-metadata")
@click.argument("metadata_file", type=click.Path(dir_okay=False))
@click.option("--repo", "repo_id", required=True, help="The metadata repo, USER/REPO (created if missing).")
@click.option("--message", "commit_message", help="Commit message.")
@click.option("--repo-type", type=click.Choice(["model", "dataset"]), default="model", show_default=True)
@token_option
@json_option
def upload_metadata_cmd(metadata_file: str, repo_id: str, commit_message: str | None, repo_type: str,
                        token: str | None, as_json: bool) -> None:
    """Validate METADATA_FILE and commit it to models/<org>--<name>/metadata.json of the repo."""
    set_json_mode(as_json)
    from williw.pull import MetadataUploader, UploadConfig

    result = MetadataUploader().upload_metadata(UploadConfig(metadata_file=metadata_file, repo_id=repo_id,
                                                             hf_token=token, commit_message=commit_message,
                                                             repo_type=repo_type))
    emit(as_json, {"url": result.url, "commit_id": result.commit_id, "path_in_repo": result.path_in_repo},
         f"uploaded {result.path_in_repo} (commit {result.commit_id[:12]})\n{result.url}")


@cli.command("pull")
@click.argument("model")
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False), help="The plan JSON.")
@click.option("--node", "node_id", required=True, help="The node whose shard to fetch.")
@click.option("-o", "--output", default="shards", show_default=True, type=click.Path(file_okay=False),
              help="Shards folder; the shard goes to OUTPUT/<node_id>/.")
@click.option("--revision", help="Branch, tag or commit (default: main).")
@click.option("--model-name", help="Name recorded in the manifest (default: the plan's, else the repo name).")
@token_option
@json_option
def pull_cmd(model: str, plan_path: str, node_id: str, output: str, revision: str | None,
             model_name: str | None, token: str | None, as_json: bool) -> None:
    """Fetch only NODE's tensors of MODEL (a Hub repo id or a model server URL) by HTTP ranges, and write the same
    shard and manifest as williw split."""
    set_json_mode(as_json)
    from williw.planner.plan import load_plan
    from williw.pull import pull_shard
    from williw.units import format_bytes

    r = pull_shard(model, load_plan(plan_path), node_id, output, revision=revision, token=token,
                   model_name=model_name)
    out = {"node_id": r.node_id, "shard_path": r.shard_path, "shard_bytes": r.shard_bytes,
           "tensor_bytes": r.tensor_bytes, "header_bytes": r.header_bytes, "bytes_downloaded": r.bytes_downloaded,
           "requests": r.requests, "sha256": r.file_sha256, "status": "skipped" if r.skipped else "written"}

    def human() -> str:
        return table([[r.node_id, format_bytes(r.shard_bytes), format_bytes(r.bytes_downloaded), str(r.requests),
                       out["status"], r.shard_path]], ["node", "shard", "downloaded", "requests", "status", "path"])

    emit(as_json, out, human)
