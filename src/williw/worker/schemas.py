"""Request and response bodies at the HTTP boundary (pydantic). Unknown fields are refused, so a typo in a
field name is a 422 naming it rather than a silently ignored value."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from williw.devices import check_device, check_dtype, check_weights, format_conflict
from williw.fleet import check_number
from williw.jsonio import INT64_MAX

# Hugging Face repo ids ("owner/name" or "name"): letters, digits, '.', '_', '-'. Refusing everything else keeps
# '..', '/' tricks and control characters away from the Hub client and any path built from the name.
REPO_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$"
NODE_ID_MAX = 128
ID_MAX = 128


def _range(field: str) -> AfterValidator:
    # The fleet file's rule (`williw.fleet.check_number`), so a node registered over HTTP plans like one from a
    # file; a ValueError becomes a 422 naming the field.
    return AfterValidator(lambda value: check_number(field, value))


_Number = Annotated[float, Field(allow_inf_nan=False)]


class StrictBody(BaseModel):
    """Every request body's base: unknown fields and coerced values are 422s."""

    # strict: no coercion, as in a nodes file (`williw.fleet.check_number` refuses true and "5"); lax pydantic
    # registered {"latency_ms": true} as 1.0 ms and took {"batch_size": true, "sequence_length": "64"}.
    model_config = ConfigDict(extra="forbid", strict=True)


class RequestIn(StrictBody):
    model_name: str = Field(pattern=REPO_ID_PATTERN, description="Hugging Face model id, e.g. owner/name")
    node_id: str | None = Field(default=None, min_length=1, max_length=NODE_ID_MAX,
                                description="the user node that asks")
    batch_size: int = Field(default=1, ge=1, le=1_000_000)
    sequence_length: int = Field(default=512, ge=1, le=10_000_000)


class ProcessIn(StrictBody):
    request_id: str = Field(min_length=1, max_length=ID_MAX)
    metadata_repo: str | None = Field(default=None, pattern=REPO_ID_PATTERN)
    metadata: dict[str, Any] | None = None
    model_repo: str | None = Field(default=None, pattern=REPO_ID_PATTERN)  # the worker reads the model's headers
    revision: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._/-]{1,128}$")
    strategy: Literal["pipeline", "greedy"] = "pipeline"
    objective: str = Field(default="prefill", pattern=r"^[a-z_]{1,32}$")
    # Tokens of context per sequence the plan's KV cache must hold; default: the request's sequence_length.
    context_length: int | None = Field(default=None, ge=1, le=10_000_000)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        # A branch, tag or commit: "refs/pr/1" has slashes, but no segment may be empty, "." or ".." (the
        # revision goes into Hub URLs, where "../../x" would address another path).
        if value is not None and any(part in ("", ".", "..") for part in value.split("/")):
            raise ValueError(f"must be a branch, tag or commit without empty, '.' or '..' parts, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ProcessIn:
        if [self.metadata_repo, self.metadata, self.model_repo].count(None) != 2:
            raise ValueError("give exactly one of 'metadata' (the JSON inline), 'metadata_repo' (a Hub repo holding "
                             "it) or 'model_repo' (the model's Hub repo: the worker reads its headers)")
        return self


class GetPlanIn(StrictBody):
    request_id: str = Field(min_length=1, max_length=ID_MAX)
    node_id: str | None = Field(default=None, min_length=1, max_length=NODE_ID_MAX)
    version: int | None = Field(default=None, ge=1, le=INT64_MAX)


class NodeIn(StrictBody):
    """The fields of one entry of the planner's nodes file."""

    node_id: str = Field(min_length=1, max_length=NODE_ID_MAX)
    compute_tflops: Annotated[_Number, _range("compute_tflops")]
    memory_gb: Annotated[_Number, _range("memory_gb")]
    memory_bandwidth_gbps: Annotated[_Number, _range("memory_bandwidth_gbps")] | None = None
    network_gbps: Annotated[_Number, _range("network_gbps")] | None = None
    labels: list[str] = Field(default_factory=list, max_length=64)
    latency_ms: Annotated[_Number, _range("latency_ms")] | None = None
    memory_reserve_gb: Annotated[_Number, _range("memory_reserve_gb")] | None = None
    # What the node runs its stages on and in (`williw.devices`); the nodes file's rules and messages. Left out
    # (older agents): a CPU node at float32 with its weights as stored.
    device: Annotated[str, AfterValidator(check_device)] = "cpu"
    device_name: str | None = Field(default=None, min_length=1, max_length=256)
    dtype: Annotated[str, AfterValidator(check_dtype)] = "float32"
    weights: Annotated[list[str], AfterValidator(lambda v: list(check_weights(v)))] = Field(
        default_factory=lambda: ["as-stored"])
    device_memory_bytes: int | None = Field(default=None, ge=0, le=INT64_MAX)

    @model_validator(mode="after")
    def _formats_run_there(self) -> NodeIn:
        # What `williw node` refuses before registering, refused here too: a custom client or a nodes file could
        # otherwise have int4 planned on MPS, or on CUDA at float16 (a breaker's find).
        why = format_conflict(self.device, self.dtype, tuple(self.weights))
        if why:
            raise ValueError(f"weights {', '.join(self.weights)} cannot run on device {self.device} at "
                             f"{self.dtype}: {why}")
        return self


class NodeOut(BaseModel):
    node_id: str
    compute_tflops: float
    memory_gb: float
    memory_bandwidth_gbps: float | None
    network_gbps: float | None
    labels: list[str]
    latency_ms: float | None
    memory_reserve_gb: float | None
    device: str
    device_name: str | None
    dtype: str
    weights: list[str]
    device_memory_bytes: int | None
    registered_at: float
    updated_at: float
    last_heartbeat: float
    online: bool
    heartbeat_age_s: float


class RegisterOut(BaseModel):
    node: NodeOut
    created: bool
    node_token: str = Field(description="send as 'Authorization: Bearer <node_token>' to act as this node")


class HeartbeatOut(BaseModel):
    node_id: str
    last_heartbeat: float
    ttl_s: float


class RequestOut(BaseModel):
    request_id: str
    model_name: str
    node_id: str | None
    batch_size: int
    sequence_length: int
    status: Literal["received", "planned", "failed"]
    reason: str | None
    plan_version: int | None
    created_at: float
    updated_at: float


class ProcessOut(BaseModel):
    request_id: str
    status: Literal["planned"]
    plan_version: int
    plan: dict[str, Any]
