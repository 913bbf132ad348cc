"""The rows the store hands out, as frozen dataclasses (times in Unix seconds)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NodeRecord:
    """A registered node: the planner's node fields, plus registry times (Unix seconds)."""

    node_id: str
    compute_tflops: float
    memory_gb: float
    memory_bandwidth_gbps: float | None
    network_gbps: float | None
    labels: tuple[str, ...]
    registered_at: float
    updated_at: float
    last_heartbeat: float
    latency_ms: float | None = None
    memory_reserve_gb: float | None = None
    device: str = "cpu"  # what the node runs its stages on and in (`williw.devices`, `williw.fleet.Node`)
    device_name: str | None = None
    dtype: str = "float32"
    weights: tuple[str, ...] = ("as-stored",)
    device_memory_bytes: int | None = None

    def fleet_dict(self) -> dict[str, Any]:
        """The node as an entry of the planner's nodes file (``device``, ``dtype`` and ``weights`` when they are
        not the defaults, as `williw.fleet.Node.to_dict` writes them)."""
        d: dict[str, Any] = {"node_id": self.node_id, "compute_tflops": self.compute_tflops,
                             "memory_gb": self.memory_gb, "labels": list(self.labels)}
        for key in ("memory_bandwidth_gbps", "network_gbps", "latency_ms", "memory_reserve_gb"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        for key, default in (("device", "cpu"), ("dtype", "float32"), ("weights", ("as-stored",))):
            if getattr(self, key) != default:
                d[key] = list(self.weights) if key == "weights" else getattr(self, key)
        return d

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> NodeRecord:
        """A row of the store's node columns (this class's fields, in order), read by position: `process` lists
        every node on each call (200 rows: 1.1 ms by column name, 0.5 ms so). Labels and weights are JSON; NULL
        device fields (a node registered before schema migration 5) read as the defaults."""
        labels, weights = row[5], row[14]
        return cls(row[0], row[1], row[2], row[3], row[4], tuple(json.loads(labels)) if labels != "[]" else (),
                   row[6], row[7], row[8], row[9], row[10], row[11] or "cpu", row[12], row[13] or "float32",
                   tuple(json.loads(weights)) if weights else ("as-stored",), row[15])


@dataclass(frozen=True)
class RequestRecord:
    """A user's request; ``status`` is ``received``, ``planned`` or ``failed`` (with ``reason``)."""

    request_id: str
    model_name: str
    node_id: str | None
    batch_size: int
    sequence_length: int
    status: str
    reason: str | None
    plan_version: int | None
    created_at: float
    updated_at: float
    metadata_digest: str | None = None  # see `williw.worker.migration_store`
    auto_replan: str | None = None


__all__ = ["NodeRecord", "RequestRecord"]
