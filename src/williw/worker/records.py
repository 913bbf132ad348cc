"""The rows the store hands out, as frozen dataclasses (times in Unix seconds)."""

from __future__ import annotations

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

    def fleet_dict(self) -> dict[str, Any]:
        """The node as an entry of the planner's nodes file."""
        d: dict[str, Any] = {"node_id": self.node_id, "compute_tflops": self.compute_tflops,
                             "memory_gb": self.memory_gb, "labels": list(self.labels)}
        for key in ("memory_bandwidth_gbps", "network_gbps", "latency_ms", "memory_reserve_gb"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


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
