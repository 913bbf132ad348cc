"""Cut a local model into per-node shards by a plan: the seed's ``ModelSplitter``, streaming and exact.

From safetensors, each tensor's raw bytes are copied (no decoding) in one sequential pass over each source file,
into every shard that needs them (`williw.shards.write_shards`); memory stays at a few 8 MiB pieces whatever the
model's size. From ``.bin``/``.pth`` the state dict is memory-mapped (``torch.load(mmap=True)``) and each
tensor's storage bytes are copied the same way. Everything is checked before the first byte is written: node ids
are safe folder names, every planned tensor exists, the output is not inside the model folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from williw.checkpoint import Checkpoint, TensorInfo
from williw.classify import layer_type
from williw.errors import PlanError, SplitError, require_torch
from williw.fsutil import atomic_writer
from williw.metadata import tied_head_tensors
from williw.planner.plan import Plan
from williw.planner.validate import check_plan
from williw.shards import (
    COPIED_FILES,
    PTH_FILE,
    ByteSource,
    NodeCheck,
    ShardCheckReport,
    ShardManifest,
    ShardSpec,
    WrittenShard,
    check_node_id,
    check_shards,
    expected_manifest,
    is_complete,
    open_source,
    read_manifest,
    sha256_file,
    shard_layout,
    write_shards,
)
from williw.shards.manifest import check_free_space, finish_shard, prepare_shard_dir
from williw.structure import find_structure
from williw.units import SAFETENSORS_TO_TORCH

# check_shards and its report live in williw.shards; re-exported here for the seed-style API.
__all__ = ["DEFAULT_OUTPUT", "FORMATS", "ModelSplitter", "NodeCheck", "ShardCheckReport", "SplitConfig",
           "SplitResult", "check_shards", "check_tied_copies", "read_manifest", "split_all"]

FORMATS = ("safetensors", "pth")
DEFAULT_OUTPUT = "./model_shards"
MIB = 1024 * 1024


@dataclass(frozen=True)
class SplitConfig:
    """The seed's split configuration. ``split_plan`` is a `Plan` or the seed's plan dict."""

    model_name: str
    model_path: str
    split_plan: Plan | dict[str, Any]
    output_dir: str | None = None  # default ./model_shards; the shard goes to <output_dir>/<node_id>/
    fmt: str = "safetensors"


@dataclass(frozen=True)
class SplitResult:
    """One node's shard, as the seed reports it; ``shard_size_mb`` is the file size in MiB (1024² bytes)."""

    node_id: str
    shard_path: str
    layer_names: tuple[str, ...]
    total_params: int
    shard_size_mb: float
    shared_tensors: tuple[str, ...] = ()
    file_sha256: str = ""
    skipped: bool = False  # an identical shard was already there (resume)


def as_plan(split_plan: Plan | dict[str, Any], source: str = "plan") -> Plan:
    """A `Plan` from a `Plan` or the seed's dict.

    Raises:
        PlanError: the dict is not a valid plan.
    """
    return split_plan if isinstance(split_plan, Plan) else Plan.from_dict(split_plan, source)


def plan_specs(plan: Plan, tensors: dict[str, TensorInfo], node_ids: Sequence[str] | None,
               model_dir: Path) -> list[ShardSpec]:
    """The shards to write: one per selected node, with its own tensors and its replicas.

    Raises:
        PlanError: an unknown node, a tensor listed twice for one node, or a tensor the model lacks.
        SplitError: a node id that is not a safe folder name.
    """
    for a in plan.assignments:
        check_node_id(a.node_id, "plan")
    chosen = [plan.node(n) for n in dict.fromkeys(node_ids)] if node_ids is not None else list(plan.assignments)
    specs = []
    for a in chosen:
        seen: set[str] = set()
        for name in a.tensor_names:
            if name in seen:
                raise PlanError(f"plan: node '{a.node_id}' lists tensor '{name}' twice")
            seen.add(name)
        missing = [n for n in a.tensor_names if n not in tensors]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise PlanError(f"plan: node '{a.node_id}' has tensor '{missing[0]}'{more}, which the model in "
                            f"'{model_dir}' does not have")
        specs.append(ShardSpec(a.node_id, tuple(tensors[n] for n in a.tensor_names), a.stage, a.blocks))
    return specs


def check_output_dir(output_dir: Path, model_dir: Path) -> None:
    """Refuse an output folder inside the model folder (its shards would later be read as model weights).

    Raises:
        SplitError: naming both folders.
    """
    out, model = output_dir.resolve(), model_dir.resolve()
    if out == model or model in out.parents:
        raise SplitError(f"output folder '{output_dir}' is inside the model folder '{model_dir}'; "
                         "choose a folder outside it")


def split_all(model_path: str | os.PathLike[str], plan: Plan | dict[str, Any], output_dir: str | os.PathLike[str],
              *, node_ids: Sequence[str] | None = None, fmt: str = "safetensors",
              model_name: str | None = None) -> list[SplitResult]:
    """Write the shard of every node of ``plan`` (or of ``node_ids``) under ``output_dir/<node_id>/``.

    Safetensors shards are written in one pass over the source files; shards already complete are skipped.

    Args:
        model_path: a local model folder (safetensors, or ``.bin``/``.pth`` which need torch).
        plan: a `Plan` or the seed's plan dict.
        output_dir: the shards folder; must not be inside the model folder.
        node_ids: the nodes to write (default: all of them).
        fmt: ``safetensors`` (``model.safetensors``) or ``pth`` (the seed's ``torch.save`` file; needs torch).
        model_name: recorded in the manifests (default: the plan's model name, else the folder name).

    Returns:
        One `SplitResult` per node, in plan (or ``node_ids``) order.

    Raises:
        PlanError: unknown node, or a planned tensor the model lacks.
        SplitError: unsafe node id, output inside the model folder, unknown format, no disk space, a short read.
        CheckpointError: the model folder cannot be read.
        MissingDependency: ``fmt="pth"`` or a torch source without torch installed.
    """
    if fmt not in FORMATS:
        raise SplitError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    plan = as_plan(plan)
    checkpoint, tensors, source = open_source(model_path)
    out = Path(output_dir)
    check_output_dir(out, checkpoint.path)
    specs = plan_specs(plan, tensors, node_ids, checkpoint.path)
    # The whole plan, not only the nodes written: shards of a plan that owns a tensor twice or never would not
    # add up to the model (`williw validate` refuses such a plan; so does split, before writing anything).
    check_plan(list(tensors), plan, shown=3)
    check_tied_copies(checkpoint, tensors, source)
    name = model_name or plan.model_name or checkpoint.path.resolve().name
    source_name = str(checkpoint.path.resolve())
    extra = [checkpoint.path / f for f in COPIED_FILES if (checkpoint.path / f).is_file()]
    if fmt == "safetensors":
        written = write_shards(specs, source, out, model_name=name, source_name=source_name,
                               plan_sha256=plan.digest(), extra_files=extra)
    else:
        written = _write_pth(specs, source, out, model_name=name, source_name=source_name,
                             plan_sha256=plan.digest(), extra_files=extra)
    return [_result(plan, w) for w in written]


def check_tied_copies(checkpoint: Checkpoint, tensors: dict[str, TensorInfo], source: ByteSource) -> None:
    """Refuse a stored head that the config ties to the input embedding but whose bytes differ from it.

    The metadata, from headers alone, takes such a head for a copy of the token table that the model ignores
    (`williw.metadata.tied_head_tensors`); transformers ties the two only when their values are equal, and otherwise
    runs the stored head untied, so shards cut for the tie would compute another model. Reads both tensors once,
    in pieces. Heads stored in another dtype than the table are left to ``williw verify`` (transformers compares
    them after casting both to the load dtype, which bytes cannot show).

    Raises:
        SplitError: naming the config, both tensors and the fix.
    """
    cfg = checkpoint.config
    if cfg is None or not cfg.tie_word_embeddings or not any(layer_type(n) == "lm_head" for n in tensors):
        return
    shapes = {n: t.shape for n, t in tensors.items()}
    label = checkpoint.label("config.json")
    table, copies = tied_head_tensors(cfg, find_structure(list(tensors), cfg.raw or None, label, shapes), shapes)
    for name in copies:
        a, b = tensors[table], tensors[name]  # type: ignore[index]
        if a.dtype == b.dtype and _digest(source, a) != _digest(source, b):
            raise SplitError(f"'{label}': tie_word_embeddings is true, so the output head is '{table}', but the "
                             f"checkpoint also stores '{name}' with other values, which transformers runs untied; "
                             "set tie_word_embeddings to false in config.json and make the metadata and plan again")


def _digest(source: ByteSource, t: TensorInfo) -> bytes:
    h = hashlib.sha256()
    for piece in source.read_range(t.file, t.start, t.end):  # type: ignore[arg-type]
        h.update(piece)
    return h.digest()


def _result(plan: Plan, w: WrittenShard) -> SplitResult:
    a = plan.node(w.node_id)
    params = 0
    for t in w.manifest.tensors:
        n = 1
        for d in t.shape:
            n *= d
        params += n
    return SplitResult(node_id=w.node_id, shard_path=str(w.path), layer_names=a.layer_names, total_params=params,
                       shard_size_mb=w.manifest.file_bytes / MIB, shared_tensors=a.shared_tensors,
                       file_sha256=w.manifest.file_sha256, skipped=w.skipped)


def _write_pth(specs: Sequence[ShardSpec], source: ByteSource, out: Path, *, model_name: str, source_name: str,
               plan_sha256: str, extra_files: Sequence[Path]) -> list[WrittenShard]:
    """The seed's format: ``torch.save`` of the node's state dict. It holds one node's tensors in memory."""
    require_torch("--format pth")
    import torch

    copied = [p.name for p in extra_files]
    results = []
    for spec in specs:
        shard_dir = out / spec.node_id
        expected = expected_manifest(spec, model_name=model_name, source_name=source_name, plan_sha256=plan_sha256,
                                     file=PTH_FILE, copied_files=copied)
        if is_complete(shard_dir, expected):
            results.append(WrittenShard(spec.node_id, shard_dir, read_manifest(shard_dir), skipped=True))
            continue
        state = {}
        for t in shard_layout(spec.tensors):
            dtype = SAFETENSORS_TO_TORCH.get(t.dtype)
            if dtype is None:
                raise SplitError(f"node '{spec.node_id}': tensor '{t.name}' has dtype {t.dtype}, which torch "
                                 "cannot hold; use --format safetensors")
            buf = bytearray()
            for piece in source.read_range(t.file, t.start, t.end):  # type: ignore[arg-type]
                buf += piece
            raw = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
            state[t.name] = raw.view(getattr(torch, dtype)).reshape(t.shape)
        check_free_space(out, sum(t.nbytes for t in spec.tensors))
        prepare_shard_dir(shard_dir)
        with atomic_writer(shard_dir / PTH_FILE) as f:
            torch.save(state, f)
        del state
        path = shard_dir / PTH_FILE
        manifest = ShardManifest(**{**expected.__dict__, "file_sha256": sha256_file(path),
                                    "file_bytes": path.stat().st_size})
        finish_shard(shard_dir, manifest, extra_files)
        results.append(WrittenShard(spec.node_id, shard_dir, manifest, skipped=False))
    return results


class ModelSplitter:
    """The seed's splitter: ``split_model(config, node_id)`` writes one node's shard."""

    def split_model(self, config: SplitConfig, node_id: str) -> SplitResult:
        """Extract ``node_id``'s tensors from ``config.model_path`` into ``<output_dir>/<node_id>/``.

        Args:
            config: model, plan and output folder.
            node_id: the node whose shard to write.

        Returns:
            The node's `SplitResult`.

        Raises:
            PlanError, SplitError, CheckpointError: as `split_all`.
        """
        return split_all(config.model_path, config.split_plan, config.output_dir or DEFAULT_OUTPUT,
                         node_ids=[node_id], fmt=config.fmt, model_name=config.model_name)[0]

    def split_all(self, config: SplitConfig) -> list[SplitResult]:
        """Write every node's shard in one pass over the source (see `split_all`)."""
        return split_all(config.model_path, config.split_plan, config.output_dir or DEFAULT_OUTPUT,
                         fmt=config.fmt, model_name=config.model_name)

    @staticmethod
    def validate_split_plan(all_layers: Sequence[str], split_plan: Plan | dict[str, Any]) -> None:
        """Check that every layer is owned (``layer_names``) by exactly one node and that no node names an
        unknown layer.

        Raises:
            PlanError: naming the first layer that is unassigned, assigned twice, or unknown.
        """
        plan = as_plan(split_plan)
        known = set(all_layers)
        owner: dict[str, str] = {}
        for a in plan.assignments:
            for name in a.tensor_names:
                if name not in known:
                    raise PlanError(f"plan: node '{a.node_id}' has layer '{name}', which the model does not have")
            for name in a.layer_names:
                if name in owner:
                    raise PlanError(f"plan: layer '{name}' is assigned to both '{owner[name]}' and '{a.node_id}'")
                owner[name] = a.node_id
        for name in all_layers:
            if name not in owner:
                raise PlanError(f"plan: layer '{name}' is not assigned to any node")


