"""The plan: which tensors each node holds. JSON keeps the seed's shape.

The JSON is the seed's map ``{node_id: {node_id, layer_names, total_compute, compute_utilization}}`` with more
fields per node for pipeline plans (``stage``, ``blocks`` as half-open ``[start, end)`` block indices, ``bytes``,
``stage_time_s``, ``decode_time_s``, ``shared_tensors``, and what the node runs its stage in: ``dtype``,
``weights``, ``device``), plus one reserved key ``"@plan"`` for what belongs
to the plan as a whole. ``@`` cannot occur in a node id, so the key never collides with a node and a reader
that only looks up ``plan[node_id]`` keeps working.

``shared_tensors`` are replicas a node needs but does not own: with a tied LM head the last stage needs the
embedding matrix that the first stage owns. Every tensor is owned (in ``layer_names``) by exactly one node.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from williw.errors import PlanError
from williw.fsutil import read_json, write_json
from williw.jsonio import INT64_MAX, has_nonfinite
from williw.precision import DTYPES, WEIGHTS, Precision

PLAN_KEY = "@plan"
STRATEGIES = ("pipeline", "greedy")
# Seconds, GFLOPs and bytes in a plan stay below 1e30: far above any real plan (a year is 3e7 s), and low enough
# that sums over every node stay finite, so a plan always serialises as strict JSON.
MAX_NUMBER = 1e30
_HEAD_NUMBERS = ("bottleneck_s", "prefill_bottleneck_s", "decode_bottleneck_s", "latency_s", "tokens_per_s",
                 "lower_bound_s")
_RUNTIME = ("kv_bytes", "activation_bytes", "headroom_bytes")
_PRECISION = ("dtype", "weights", "device")
_DEVICE = re.compile(r"cpu|cuda(:[0-9]{1,3})?|mps(:[0-9]{1,3})?")
_HEAD_KNOWN = {"strategy", "model_name", "objective", *_HEAD_NUMBERS, "exact", "version", "stages", "excluded"}


@dataclass(frozen=True)
class NodeAssignment:
    """One node's part. ``total_compute`` is in GFLOPs; times in seconds; ``blocks`` is ``[start, end)``."""

    node_id: str
    layer_names: tuple[str, ...]
    total_compute: float
    compute_utilization: float
    bytes: int = 0
    stage: int | None = None
    blocks: tuple[int, int] | None = None
    stage_time_s: float | None = None
    decode_time_s: float | None = None
    shared_tensors: tuple[str, ...] = ()
    kv_bytes: int | None = None  # KV cache and state at the plan's batch and context
    activation_bytes: int | None = None  # the stage's largest transient
    headroom_bytes: int | None = None  # memory - reserve - bytes - kv - activations (negative: over)
    # What the node runs its stage in (`williw.precision`): compute dtype, weight format, device. None: not recorded
    # (plans written before them); `precision` and `run_device` then give float32, as-stored and cpu.
    dtype: str | None = None
    weights: str | None = None
    device: str | None = None

    @property
    def precision(self) -> Precision:
        """The stage's compute dtype and weight format (float32 and as-stored when the plan does not say)."""
        return Precision(self.dtype or "float32", self.weights or "as-stored")

    @property
    def run_device(self) -> str:
        """Where the stage runs (``cpu`` when the plan does not say)."""
        return self.device or "cpu"

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Everything the node's shard must hold: its own tensors, then its replicas."""
        return self.layer_names + self.shared_tensors

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"node_id": self.node_id, "layer_names": list(self.layer_names),
                             "total_compute": self.total_compute, "compute_utilization": self.compute_utilization,
                             "bytes": self.bytes}
        if self.stage is not None:
            d["stage"] = self.stage
        if self.blocks is not None:
            d["blocks"] = list(self.blocks)
        for key in ("stage_time_s", "decode_time_s"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.shared_tensors:
            d["shared_tensors"] = list(self.shared_tensors)
        for key in (*_RUNTIME, *_PRECISION):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


@dataclass(frozen=True)
class ExcludedNode:
    node_id: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """A whole plan. For ``pipeline`` plans ``assignments`` are in stage order."""

    strategy: str
    assignments: tuple[NodeAssignment, ...]
    model_name: str = ""
    objective: str = "prefill"
    bottleneck_s: float | None = None  # the objective's slowest stage
    prefill_bottleneck_s: float | None = None
    decode_bottleneck_s: float | None = None
    latency_s: float | None = None  # sum of stage prefill times: one request end to end
    tokens_per_s: float | None = None
    lower_bound_s: float | None = None
    exact: bool | None = None  # True when the search was exhaustive
    excluded: tuple[ExcludedNode, ...] = ()
    version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def node(self, node_id: str) -> NodeAssignment:
        for a in self.assignments:
            if a.node_id == node_id:
                return a
        raise PlanError(f"node '{node_id}' is not in the plan (nodes: {', '.join(self.node_ids) or 'none'})")

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(a.node_id for a in self.assignments)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {a.node_id: a.to_dict() for a in self.assignments}
        head = {k: getattr(self, k) for k in ("strategy", "model_name", "objective", "bottleneck_s",
                                              "prefill_bottleneck_s", "decode_bottleneck_s", "latency_s",
                                              "tokens_per_s", "lower_bound_s", "exact", "version")}
        head["stages"] = list(self.node_ids)
        head["excluded"] = [{"node_id": e.node_id, "reason": e.reason} for e in self.excluded]
        head.update(self.extra)
        d[PLAN_KEY] = head
        return d

    def digest(self) -> str:
        """sha256 of the canonical JSON: the identity a shard manifest records."""
        return plan_digest(self.to_dict())

    @staticmethod
    def from_dict(d: Any, source: str = "plan") -> Plan:
        """Validate a plan dict; a seed plan (no ``@plan`` key) is read as a greedy plan.

        Raises:
            PlanError: one line naming ``source``, the node and the field.
        """
        if not isinstance(d, dict) or not d:
            raise PlanError(f"'{source}': a plan must be a non-empty JSON object of node_id -> assignment")
        head = d.get(PLAN_KEY, {})
        assignments = [_assignment(key, value, source) for key, value in d.items() if key != PLAN_KEY]
        h = check_head(head, [a.node_id for a in assignments], source)
        if h["stages"] is not None:
            order = h["stages"]
            assignments.sort(key=lambda a: order.index(a.node_id))
        elif h["strategy"] == "pipeline":
            assignments.sort(key=lambda a: (a.stage is None, a.stage or 0))
        return Plan(assignments=tuple(assignments), **{k: v for k, v in h.items() if k != "stages"})


def _assignment(key: str, value: Any, source: str) -> NodeAssignment:
    where = f"'{source}': node '{key}'"
    if not isinstance(value, dict):
        raise PlanError(f"{where} must be an object with node_id, layer_names, total_compute, "
                        "compute_utilization")
    node_id = value.get("node_id", key)
    if node_id != key:
        raise PlanError(f"{where} has node_id {node_id!r}; the key and node_id must match")
    names = value.get("layer_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PlanError(f"{where}: field 'layer_names' must be a list of tensor names")
    shared = value.get("shared_tensors", [])
    if not isinstance(shared, list) or not all(isinstance(n, str) for n in shared):
        raise PlanError(f"{where}: field 'shared_tensors' must be a list of tensor names")
    nums: dict[str, float | None] = {}
    for f in ("total_compute", "compute_utilization", "bytes", "stage_time_s", "decode_time_s"):
        v = value.get(f, 0.0 if f in ("total_compute", "compute_utilization", "bytes") else None)
        if v is None:
            nums[f] = None
            continue
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0 or v > MAX_NUMBER:
            raise PlanError(f"{where}: field '{f}' must be a finite number >= 0, got {_short(v)}")
        nums[f] = float(v)
    blocks = value.get("blocks")
    if blocks is not None and not (isinstance(blocks, list) and len(blocks) == 2
                                   and all(_int_in(b, 0) for b in blocks) and blocks[0] <= blocks[1]):
        raise PlanError(f"{where}: field 'blocks' must be [start, end) with 0 <= start <= end, got {_short(blocks)}")
    stage = value.get("stage")
    if stage is not None and not _int_in(stage, 0):
        raise PlanError(f"{where}: field 'stage' must be an integer >= 0, got {_short(stage)}")
    return NodeAssignment(node_id=key, layer_names=tuple(names), total_compute=nums["total_compute"] or 0.0,
                          compute_utilization=nums["compute_utilization"] or 0.0, bytes=int(nums["bytes"] or 0),
                          stage=stage, blocks=tuple(blocks) if blocks is not None else None,  # type: ignore[arg-type]
                          stage_time_s=nums["stage_time_s"], decode_time_s=nums["decode_time_s"],
                          shared_tensors=tuple(shared), **{k: _runtime(value, k, where) for k in _RUNTIME},
                          **_precision(value, where))


def _precision(value: dict[str, Any], where: str) -> dict[str, str | None]:
    out = {k: value.get(k) for k in _PRECISION}
    for key, allowed in (("dtype", DTYPES), ("weights", WEIGHTS)):
        if out[key] is not None and out[key] not in allowed:
            raise PlanError(f"{where}: field '{key}' must be one of {', '.join(allowed)}, got {_short(out[key])}")
    device = out["device"]
    if device is not None and not (isinstance(device, str) and _DEVICE.fullmatch(device)):
        raise PlanError(f"{where}: field 'device' must be cpu, cuda, cuda:N, mps or mps:N, got {_short(device)}")
    return out


def _runtime(value: dict[str, Any], key: str, where: str) -> int | None:
    v = value.get(key)
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and abs(v) <= INT64_MAX
                              and (v >= 0 or key == "headroom_bytes")):
        raise PlanError(f"{where}: field '{key}' must be an integer of bytes, got {_short(v)}")
    return v


def check_head(head: Any, node_ids: list[str], source: str) -> dict[str, Any]:
    """Validate a plan's ``@plan`` object (the schema is `_HEAD_NUMBERS` plus the fields below).

    Args:
        head: the ``@plan`` value (absent in a seed plan: ``{}``).
        node_ids: the plan's node keys, in file order.
        source: the file name for messages.

    Returns:
        `Plan`'s keyword arguments (strategy, model_name, objective, the seconds fields, exact, excluded, version,
        extra) plus ``stages`` (the stage order, or None when not given).

    Raises:
        PlanError: ``"'<source>': '@plan.<field>' must be <what>, got <value>"``.
    """
    if not isinstance(head, dict):
        raise PlanError(f"'{source}': '{PLAN_KEY}' must be an object, got {_short(head)}")

    def bad(key: str, what: str) -> PlanError:
        return PlanError(f"'{source}': '{PLAN_KEY}.{key}' must be {what}, got {_short(head[key])}")

    out: dict[str, Any] = {"strategy": head.get("strategy", "greedy")}
    if out["strategy"] not in STRATEGIES:
        raise bad("strategy", f"one of {', '.join(STRATEGIES)}")
    for key, default in (("model_name", ""), ("objective", "prefill")):
        out[key] = head.get(key, default)
        if not isinstance(out[key], str):
            raise bad(key, "a string")
    for key in _HEAD_NUMBERS:
        v = out[key] = head.get(key)
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v)
                              or not 0 <= v <= MAX_NUMBER):
            raise bad(key, "null or a finite number >= 0")
    out["exact"] = head.get("exact")
    if out["exact"] is not None and not isinstance(out["exact"], bool):
        raise bad("exact", "null, true or false")
    out["version"] = head.get("version", 1)
    if not _int_in(out["version"], 1):
        raise bad("version", f"an integer in [1, {INT64_MAX}]")
    stages = out["stages"] = head.get("stages")
    if stages is not None and (not isinstance(stages, list) or len(stages) != len(set(map(repr, stages)))
                               or sorted(map(repr, stages)) != sorted(map(repr, node_ids))):
        raise bad("stages", "a list naming each node of the plan once")
    excluded = head.get("excluded", [])
    if not isinstance(excluded, list) or not all(
            isinstance(e, dict) and isinstance(e.get("node_id"), str) and isinstance(e.get("reason"), str)
            for e in excluded):
        raise bad("excluded", 'a list of {"node_id": <string>, "reason": <string>}')
    out["excluded"] = tuple(ExcludedNode(e["node_id"], e["reason"]) for e in excluded)
    out["extra"] = {k: v for k, v in head.items() if k not in _HEAD_KNOWN}
    for key, value in out["extra"].items():  # kept as they are, and written again: only what JSON can hold
        if has_nonfinite(value):
            raise bad(key, "a JSON value without inf or NaN")
    # The workload the plan holds (`capacity.workload`): replan plans for it again, so a bad one is refused here
    # rather than quietly replaced by the metadata's defaults.
    for key in ("batch_size", "context_length"):
        if head.get(key) is not None and not _int_in(head[key], 1):
            raise bad(key, f"null or an integer in [1, {INT64_MAX}]")
    return out


def _int_in(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= INT64_MAX


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text):,} characters)"


def plan_digest(plan_dict: dict[str, Any]) -> str:
    """sha256 of a plan's canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(plan_dict, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(canonical).hexdigest()


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate a plan JSON file.

    Raises:
        PlanError: missing file, invalid JSON, or a malformed node entry.
    """
    path = Path(path)
    data = read_json(path, PlanError, "no such plan file")
    return Plan.from_dict(data, str(path))


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Write the plan JSON atomically.

    Raises:
        PlanError: the plan holds NaN or Infinity (it would not read back); nothing is written.
    """
    try:
        write_json(path, plan.to_dict())
    except ValueError:
        raise PlanError(f"'{path}': the plan holds a number that is not finite; nothing written") from None
