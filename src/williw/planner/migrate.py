"""The migration schedule: how the fleet goes from one plan version to the next without stopping service.

The schedule is a small DAG of steps (each lists the ids it comes ``after``):

* ``pull``: node ``node_id`` fetches ``tensors`` from ``source``, a live node that holds them in the current plan
  (a peer: inside the fleet, and it cannot have dropped them, see below), or `MODEL_SOURCE` (the model's own
  files) when no live node holds them. A step carries at most ``max_step_bytes``; a single tensor larger than
  that is a step of its own, marked ``oversize`` (tensors are the unit a shard stores, so we do not cut one).
* ``switch``: after every pull, the worker puts ``to_version`` in force.
* ``drop``: make-before-break. A node drops a tensor only after every new holder of it reported its pull ready
  *and* after the switch: until the switch the old plan still routes requests through the old holder, so
  dropping as soon as the new holder is ready would break the version still serving.

The price of make-before-break is memory: while migrating, a node holds the union of its old and new tensors
(``peak_bytes`` per node; ``over_memory`` when that exceeds the node's memory, for the caller to decide).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from williw.errors import PlanError
from williw.fleet import Node
from williw.metadata import ModelMetadata
from williw.planner.plan import Plan

MODEL_SOURCE = "@model"  # "@" cannot occur in a node id, so this never names a peer


@dataclass(frozen=True)
class MigrationStep:
    """One step. ``action`` is ``pull``, ``switch`` or ``drop``; ``after`` lists the step ids it waits for."""

    id: int
    action: str
    node_id: str | None = None  # None for the switch, which the worker performs
    source: str | None = None  # pulls only: a node id or MODEL_SOURCE
    tensors: tuple[str, ...] = ()
    blocks: tuple[int, ...] = ()  # block indices the tensors belong to (a block may span several steps)
    bytes: int = 0
    after: tuple[int, ...] = ()
    oversize: bool = False  # one tensor larger than max_step_bytes

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "action": self.action}
        if self.node_id is not None:
            d["node_id"] = self.node_id
        if self.source is not None:
            d["source"] = self.source
        if self.action != "switch":
            d.update(tensors=list(self.tensors), blocks=list(self.blocks), bytes=self.bytes)
        d["after"] = list(self.after)
        if self.oversize:
            d["oversize"] = True
        return d


@dataclass(frozen=True)
class NodeMigration:
    """What one node does: bytes it pulls and drops, what it holds before and after, and its peak meanwhile."""

    node_id: str
    pull_bytes: int
    drop_bytes: int
    held_bytes: int  # before the migration
    new_bytes: int  # after it
    peak_bytes: int  # the union of both: make-before-break holds old and new at once
    memory_bytes: int

    @property
    def over_memory(self) -> bool:
        return self.peak_bytes > self.memory_bytes


@dataclass(frozen=True)
class MigrationSchedule:
    """The steps from plan ``from_version`` to ``to_version``, pulls first, then the switch, then drops."""

    from_version: int
    to_version: int
    max_step_bytes: int | None
    steps: tuple[MigrationStep, ...]
    nodes: tuple[NodeMigration, ...]

    @property
    def pull_bytes(self) -> int:
        """Every byte pulled: the bytes the re-plan moves."""
        return sum(s.bytes for s in self.steps if s.action == "pull")

    @property
    def peer_bytes(self) -> int:
        """Bytes pulled from a peer rather than from the model's source."""
        return sum(s.bytes for s in self.steps if s.action == "pull" and s.source != MODEL_SOURCE)

    def to_dict(self) -> dict[str, Any]:
        return {"from_version": self.from_version, "to_version": self.to_version,
                "max_step_bytes": self.max_step_bytes, "model_source": MODEL_SOURCE,
                "pull_bytes": self.pull_bytes, "peer_bytes": self.peer_bytes,
                "model_bytes": self.pull_bytes - self.peer_bytes,
                "steps": [s.to_dict() for s in self.steps],
                "nodes": [{"node_id": v.node_id, "pull_bytes": v.pull_bytes, "drop_bytes": v.drop_bytes,
                           "held_bytes": v.held_bytes, "new_bytes": v.new_bytes, "peak_bytes": v.peak_bytes,
                           "memory_bytes": v.memory_bytes, "over_memory": v.over_memory} for v in self.nodes]}


def holdings(plan: Plan, live: Iterable[str]) -> dict[str, frozenset[str]]:
    """The tensors each live node holds under ``plan`` (owned and replicas); nodes that left hold nothing.

    Args:
        plan: the plan in force.
        live: ids of the nodes still in the fleet.

    Returns:
        node id -> tensor names, for the plan's nodes that are live.
    """
    alive = set(live)
    return {a.node_id: frozenset(a.tensor_names) for a in plan.assignments if a.node_id in alive}


def bytes_to_move(metadata: ModelMetadata, held: dict[str, frozenset[str]], plan: Plan) -> int:
    """Bytes ``plan`` makes its nodes pull: every tensor a node must hold and does not hold now.

    Args:
        metadata: the model, for tensor sizes.
        held: what each node holds now (see `holdings`).
        plan: the plan to move to.

    Returns:
        The bytes, counting a tensor once per node that lacks it.
    """
    size = {x.name: x.bytes for x in metadata.layers}
    return sum(size[t] for a in plan.assignments for t in set(a.tensor_names) - held.get(a.node_id, frozenset()))


def check_step_bytes(max_step_bytes: int | None) -> None:
    """Raise `PlanError` unless ``max_step_bytes`` is None or a positive integer."""
    if max_step_bytes is not None and (isinstance(max_step_bytes, bool) or not isinstance(max_step_bytes, int)
                                       or max_step_bytes <= 0):
        raise PlanError(f"max_step_bytes must be a positive integer of bytes, got {max_step_bytes!r}")


def migration_schedule(metadata: ModelMetadata, current: Plan, new: Plan, nodes: Sequence[Node],
                       max_step_bytes: int | None = None) -> MigrationSchedule:
    """The steps from ``current`` to ``new`` on the fleet ``nodes``.

    Args:
        metadata: the model both plans cut.
        current: the plan in force; its nodes missing from ``nodes`` have left (and hold nothing).
        new: the plan to move to; every node of it must be in ``nodes``.
        nodes: the live fleet.
        max_step_bytes: the most bytes one pull step carries (None: one step per node and source).

    Returns:
        The schedule; steps are numbered in order, pulls in the new plan's stage order and model order.

    Raises:
        PlanError: ``max_step_bytes`` is not a positive integer, a node of ``new`` is not in the fleet, or a plan
            names a tensor the model does not have.
    """
    check_step_bytes(max_step_bytes)
    fleet = {v.node_id: v for v in nodes}
    order = {x.name: i for i, x in enumerate(metadata.layers)}  # model order
    size = {x.name: x.bytes for x in metadata.layers}
    block = {x.name: x.block for x in metadata.layers}
    for label, plan in (("current", current), ("new", new)):
        for a in plan.assignments:
            unknown = next((t for t in a.tensor_names if t not in order), None)
            if unknown is not None:
                raise PlanError(f"the {label} plan's node '{a.node_id}' holds '{unknown}', which the model "
                                f"'{metadata.model_name}' does not have")
    for a in new.assignments:
        if a.node_id not in fleet:
            raise PlanError(f"the new plan's node '{a.node_id}' is not in the fleet")
    held = holdings(current, fleet)
    wants = {a.node_id: frozenset(a.tensor_names) for a in new.assignments}

    def source(t: str) -> str:
        # A peer over the model's source (it is inside the fleet); among peers, one that keeps the tensor, so
        # its copy is not on the way out; then the earliest stage of the current plan.
        peers = [u for u in held if t in held[u]]
        if not peers:
            return MODEL_SOURCE
        return min(peers, key=lambda u: (t not in wants.get(u, ()), current.node_ids.index(u)))

    steps: list[MigrationStep] = []
    pulled_by: dict[str, list[int]] = {}
    for a in new.assignments:
        need = sorted(wants[a.node_id] - held.get(a.node_id, frozenset()), key=order.__getitem__)
        by_source: dict[str, list[str]] = {}
        for t in need:
            by_source.setdefault(source(t), []).append(t)
        for src, names in by_source.items():
            for chunk, oversize in _chunks(names, size, max_step_bytes):
                steps.append(_step(len(steps), "pull", a.node_id, chunk, size, block, source=src, oversize=oversize))
                for t in chunk:
                    pulled_by.setdefault(t, []).append(steps[-1].id)
    switch = MigrationStep(len(steps), "switch", after=tuple(s.id for s in steps))
    steps.append(switch)
    for a in current.assignments:
        if a.node_id not in held:
            continue
        drop = sorted(held[a.node_id] - wants.get(a.node_id, frozenset()), key=order.__getitem__)
        groups: dict[tuple[int, ...], list[str]] = {}  # by the pulls they wait for: each drops as soon as it may
        for t in drop:
            groups.setdefault(tuple(sorted(pulled_by.get(t, ()))), []).append(t)
        for deps, names in groups.items():
            steps.append(_step(len(steps), "drop", a.node_id, names, size, block, after=(switch.id, *deps)))
    return MigrationSchedule(current.version, new.version, max_step_bytes, tuple(steps),
                             _summaries(current, new, held, wants, size, fleet))


def _chunks(names: list[str], size: dict[str, int], limit: int | None) -> list[tuple[list[str], bool]]:
    """Consecutive runs of ``names`` of at most ``limit`` bytes; a tensor above the limit alone, oversize."""
    if limit is None:
        return [(names, False)] if names else []
    out: list[tuple[list[str], bool]] = []
    cur: list[str] = []
    total = 0
    for t in names:
        if size[t] > limit:
            if cur:
                out.append((cur, False))
            out.append(([t], True))
            cur, total = [], 0
            continue
        if cur and total + size[t] > limit:
            out.append((cur, False))
            cur, total = [], 0
        cur.append(t)
        total += size[t]
    if cur:
        out.append((cur, False))
    return out


def _step(i: int, action: str, node_id: str, names: list[str], size: dict[str, int], block: dict[str, int | None],
          *, source: str | None = None, after: tuple[int, ...] = (), oversize: bool = False) -> MigrationStep:
    blocks = tuple(sorted({b for t in names if (b := block[t]) is not None}))
    return MigrationStep(i, action, node_id, source, tuple(names), blocks, sum(size[t] for t in names), after,
                         oversize)


def _summaries(current: Plan, new: Plan, held: dict[str, frozenset[str]], wants: dict[str, frozenset[str]],
               size: dict[str, int], fleet: dict[str, Node]) -> tuple[NodeMigration, ...]:
    ids = list(new.node_ids) + [u for u in current.node_ids if u in held and u not in wants]

    def total(names: Iterable[str]) -> int:
        return sum(size[t] for t in names)

    out = []
    for u in ids:
        old, nxt = held.get(u, frozenset()), wants.get(u, frozenset())
        out.append(NodeMigration(u, total(nxt - old), total(old - nxt), total(old), total(nxt), total(old | nxt),
                                 fleet[u].memory_bytes))
    return tuple(out)
