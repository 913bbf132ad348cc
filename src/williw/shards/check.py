"""``check-shards``: each shard holds exactly its node's tensors, byte-equal to the model's; together, all of them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from williw.checkpoint import TensorInfo, open_checkpoint
from williw.errors import SplitError, WilliwError
from williw.planner.plan import Plan
from williw.shards.manifest import PTH_FILE, check_node_id, read_manifest, sha256_file
from williw.shards.sources import ByteSource, LocalFileSource, open_source


@dataclass(frozen=True)
class NodeCheck:
    """One node's shard as found: ``problems`` is empty when it holds exactly its tensors, byte for byte."""

    node_id: str
    shard_dir: str
    tensors: int
    bytes: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class ShardCheckReport:
    """The result of `check_shards`: per node, plus model tensors that no shard holds."""

    nodes: tuple[NodeCheck, ...]
    unassigned: tuple[str, ...]

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(p for n in self.nodes for p in n.problems) + tuple(
            f"tensor '{name}' of the model is in no shard" for name in self.unassigned)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_shards(shards_dir: str | os.PathLike[str], plan: Plan | dict[str, Any],
                 model_dir: str | os.PathLike[str]) -> ShardCheckReport:
    """Check that each node's shard holds exactly its tensors, each byte-equal to the model's, that its file
    matches its manifest's sha256, and that together the shards hold every tensor of the model.

    Args:
        shards_dir: the folder holding ``<node_id>/`` shard folders.
        plan: the plan the shards were cut by.
        model_dir: the source model folder.

    Returns:
        A `ShardCheckReport`; it lists problems rather than raising on them.

    Raises:
        PlanError: the plan is malformed. CheckpointError: the model cannot be read.
    """
    plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
    _, tensors, source = open_source(model_dir)
    nodes = []
    held: set[str] = set()
    for a in plan.assignments:
        check = _check_node(Path(shards_dir), a.node_id, a.tensor_names, plan.digest(), tensors, source)
        nodes.append(check[0])
        held |= check[1]
    return ShardCheckReport(nodes=tuple(nodes), unassigned=tuple(n for n in tensors if n not in held))


def _check_node(shards_dir: Path, node_id: str, planned: tuple[str, ...], digest: str,
                tensors: dict[str, TensorInfo], source: ByteSource) -> tuple[NodeCheck, set[str]]:
    where = f"node '{node_id}'"
    shard_dir = shards_dir / node_id
    problems: list[str] = []

    def done() -> tuple[NodeCheck, set[str]]:
        return NodeCheck(node_id, str(shard_dir), len(found), sum(t.nbytes for t in found.values()),
                         tuple(problems)), set(found)

    found: dict[str, TensorInfo] = {}
    try:
        check_node_id(node_id, "plan")
        manifest = read_manifest(shard_dir)
    except SplitError as exc:
        problems.append(f"{where}: {exc}")
        return done()
    if manifest.plan_sha256 != digest:
        problems.append(f"{where}: the shard was cut for another plan (plan_sha256 {manifest.plan_sha256[:12]}, "
                        f"expected {digest[:12]})")
    path = shard_dir / manifest.file
    if not path.is_file():
        problems.append(f"{where}: '{path}' is missing")
        return done()
    if sha256_file(path) != manifest.file_sha256:
        problems.append(f"{where}: '{path}' does not match the sha256 in its manifest")
    try:
        shard_tensors, shard_source = _open_shard(path)
    except WilliwError as exc:
        problems.append(f"{where}: {exc}")
        return done()
    found = shard_tensors
    if [t.name for t in manifest.tensors] != sorted(found, key=lambda n: found[n].start or 0):
        problems.append(f"{where}: the manifest's tensor list differs from the tensors in '{path}'")
    for name in planned:
        if name not in found:
            problems.append(f"{where}: tensor '{name}' of the plan is missing from the shard")
    for name, t in found.items():
        if name not in planned:
            problems.append(f"{where}: tensor '{name}' is in the shard but not in the plan")
            continue
        s = tensors.get(name)
        if s is None:
            continue  # the plan names a tensor the model lacks; the split refuses such plans
        if (t.dtype, t.shape) != (s.dtype, s.shape):
            problems.append(f"{where}: tensor '{name}' is {t.dtype} {list(t.shape)} in the shard but "
                            f"{s.dtype} {list(s.shape)} in the model")
            continue
        at = _first_difference(shard_source.read_range(t.file, t.start, t.end),  # type: ignore[arg-type]
                               source.read_range(s.file, s.start, s.end))  # type: ignore[arg-type]
        if at is not None:
            problems.append(f"{where}: tensor '{name}' differs from the model's at byte {at:,}")
    return done()


def _open_shard(path: Path) -> tuple[dict[str, TensorInfo], ByteSource]:
    if path.name == PTH_FILE:
        checkpoint, tensors, source = open_source(path)
        return tensors, source
    checkpoint = open_checkpoint(path)
    return dict(checkpoint.by_name), LocalFileSource(path.parent)


def _first_difference(a: Iterator[Any], b: Iterator[Any]) -> int | None:
    """Offset of the first byte where two piece streams differ (a length difference counts), else None."""
    pos = 0
    left = memoryview(b"")
    for piece in a:
        view = memoryview(piece).cast("B") if not isinstance(piece, bytes) else memoryview(piece)
        off = 0
        while off < len(view):
            if not left:
                nxt = next(b, None)
                if nxt is None:
                    return pos + off
                left = memoryview(nxt).cast("B") if not isinstance(nxt, bytes) else memoryview(nxt)
                continue
            n = min(len(view) - off, len(left))
            x, y = bytes(view[off:off + n]), bytes(left[:n])
            if x != y:
                return pos + off + next(i for i in range(n) if x[i] != y[i])
            off += n
            left = left[n:]
        pos += len(view)
    if left or next(b, None) is not None:
        return pos
    return None
