"""The seven steps of `williw.workflow.NodeClient`, one method each; each returns ``(status, detail)`` and
records its result in the run state so that a re-run can skip it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from williw.client import WorkerHTTPError
from williw.fsutil import write_json

if TYPE_CHECKING:
    from williw.serve import ModelServer
    from williw.workflow import NodeClient, StepResult, WorkflowResult


class Steps:
    """One run's steps over ``node``'s client, state and options."""

    def __init__(self, node: NodeClient, model_name: str, batch_size: int, sequence_length: int) -> None:
        self.node = node
        self.model_name = model_name
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.state = node.state
        self.server: ModelServer | None = None
        self.meta: Any = None
        self.shards: dict[str, dict[str, Any]] = {}
        self.plan_dict: dict[str, Any] = {}
        self.source = ""

    def request(self) -> tuple[str, str]:
        rid = self.state.get("request_id")
        if rid:
            try:
                self.node.client.get_request(rid)
                return "skipped", f"request {rid} (from the last run)"
            except WorkerHTTPError as exc:
                if exc.status_code != 404:
                    raise
                # The worker lost it (another database): start the worker-side steps again.
                for key in ("request_id", "plan_version", "processed"):
                    self.state.pop(key, None)
        name = self._repo_name()
        answer = self.node.client.create_request(name, self.node.node_id, self.batch_size, self.sequence_length)
        self.state["request_id"] = answer["request_id"]
        return "done", f"request {answer['request_id']} for {name}"

    def download(self) -> tuple[str, str]:
        from williw.hub import DownloadConfig, ModelDownloader

        local = Path(self.model_name).expanduser()
        if local.is_dir():
            self.state["model_dir"] = str(local.resolve())
            return "skipped", f"local folder {local}"
        if self.node.pull_from == "hub":
            self.state.pop("model_dir", None)
            return "skipped", "nothing to download: the metadata comes from the repo's headers, the nodes pull " \
                              "their own ranges from the Hub"
        out = self.node.work_dir / "model"
        result = ModelDownloader(self.node.hf_token).download_model(
            DownloadConfig(self.model_name, hf_token=self.node.hf_token, local_dir=str(out),
                           endpoint=self.node.hub_endpoint, revision=self.node.revision))
        self.state["model_dir"] = result.local_path
        self.state["model_commit"] = result.commit
        from williw.units import format_bytes

        size = format_bytes(result.total_size_mb * 2**20)
        return "done", f"{len(result.files)} files, {size} in {result.local_path}"

    def metadata(self) -> tuple[str, str]:
        from williw.errors import MetadataError
        from williw.metadata import generate_metadata, load_metadata, save_metadata

        path = self.node.work_dir / "metadata.json"
        if self.state.get("metadata_file") == str(path):
            try:
                self.meta = load_metadata(path)
                return "skipped", f"{path} (from the last run)"
            except MetadataError:
                pass
        source: Any = self.state.get("model_dir")
        read = ""
        if source is None:  # from the Hub's headers, pinned to the commit the distribution will pull from
            from williw.remote_checkpoint import open_remote_checkpoint
            from williw.units import format_bytes

            fetched = open_remote_checkpoint(self.model_name, revision=self.node.revision, token=self.node.hf_token,
                                             endpoint=self.node.hub_endpoint)
            source = fetched.checkpoint
            self.state["model_commit"] = source.commit
            read = f" (headers at {source.commit[:12]}, {format_bytes(fetched.bytes_received)} read)"
        self.meta = generate_metadata(source, model_name=self._repo_name(),
                                      batch_size=self.batch_size, sequence_length=self.sequence_length)
        save_metadata(self.meta, path)
        self.state["metadata_file"] = str(path)
        self.state.pop("uploaded", None)
        return "done", (f"{self.meta.total_layers} tensors, {self.meta.total_params:,} parameters, "
                        f"{self.meta.total_compute:,.1f} GFLOPs -> {path}{read}")

    def upload(self) -> tuple[str, str]:
        repo = self.node.metadata_repo
        if repo is None:
            return "skipped", "no metadata repo: the metadata goes to the worker inline"
        if self.state.get("uploaded"):
            return "skipped", f"already in {repo} (commit {self.state['uploaded'][:12]})"
        from williw.pull import MetadataUploader, UploadConfig

        result = MetadataUploader().upload_metadata(UploadConfig(self.state["metadata_file"], repo,
                                                                 hf_token=self.node.hf_token,
                                                                 endpoint=self.node.hub_endpoint))
        self.state["uploaded"] = result.commit_id
        return "done", f"{repo}/{result.path_in_repo} (commit {result.commit_id[:12]})"

    def process(self) -> tuple[str, str]:
        rid = self.state["request_id"]
        version = self.state.get("plan_version")
        if version is not None and self.node.client.get_request(rid).get("plan_version") == version:
            return "skipped", f"plan version {version} (from the last run)"
        if self.node.metadata_repo:
            answer = self.node.client.process(rid, metadata_repo=self.node.metadata_repo)
        else:
            answer = self.node.client.process(rid, metadata=self.meta.to_dict())
        self.state["plan_version"] = answer["plan_version"]
        nodes = [k for k in answer["plan"] if not k.startswith("@")]
        return "done", f"plan version {answer['plan_version']} on {len(nodes)} node(s)"

    def plan(self) -> tuple[str, str]:
        from williw.errors import PlanError
        from williw.planner import validate_split_plan
        from williw.planner.plan import Plan

        rid, version = self.state["request_id"], self.state["plan_version"]
        self.plan_dict = self.node.client.get_plan(rid, version=version)
        plan = Plan.from_dict(self.plan_dict, f"plan version {version} of request {rid}")
        problems = validate_split_plan([x.name for x in self.meta.layers], plan, metadata=self.meta)
        if problems:
            raise PlanError(f"the worker's plan does not fit the model: {'; '.join(problems)}")
        write_json(self.node.work_dir / "plan.json", self.plan_dict)
        return "done", f"{len(plan.assignments)} node(s), bottleneck {plan.bottleneck_s or 0:.4g} s"

    def distribute(self) -> tuple[str, str]:
        rid, version = self.state["request_id"], self.state["plan_version"]
        revision = None
        if self.node.pull_from == "hub":
            source, revision = self.model_name, self.state.get("model_commit")
        else:
            from williw.serve import ModelServer

            self.server = ModelServer(self.state["model_dir"], self.node.serve_host, 0).start()
            source = self.server.url
        try:
            self.node.client.distribute(rid, source, revision, auto_replan=self.node.auto_replan or None)
            self.shards = self.node.wait_ready(rid, version)
        finally:
            if self.server is not None:
                self.server.shutdown()
                self.server.server_close()
        self.source = source
        self.state["distributed"] = True
        return "done", f"{len(self.shards)} shard(s) ready, pulled from {source}"

    def result(self, steps: list[StepResult]) -> WorkflowResult:
        from williw.workflow import WorkflowResult

        return WorkflowResult(request_id=self.state["request_id"], model_name=self._repo_name(),
                              model_dir=self.state.get("model_dir") or "", plan_version=self.state["plan_version"],
                              plan=self.plan_dict, source=self.source, shards=self.shards, steps=list(steps))

    def _repo_name(self) -> str:
        """The model's name for the worker: the repo id, or ``local/<folder>`` for a local folder."""
        if self.node.model_label:
            return self.node.model_label
        local = Path(self.model_name).expanduser()
        if local.is_dir():
            return f"local/{local.resolve().name}"
        return self.model_name


__all__ = ["Steps"]
