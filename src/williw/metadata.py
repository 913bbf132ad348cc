"""Metadata: every tensor with its block, layer type, bytes and estimated compute; JSON in and out.

The JSON keeps the seed's fields (``model_name``, ``model_type``, ``batch_size``, ``sequence_length``,
``layers[]`` with ``name, shape, num_params, compute_required, layer_type, dtype``, ``total_compute``,
``total_layers``) and adds what planning needs: per tensor ``bytes``, ``block`` and ``placement``, a ``blocks[]``
summary, totals, ``architecture``, the tied LM head, and ``format_version``.
Structure: `williw.structure.find_structure` reads the stacks from ``config.json`` in execution order (vision
tower → language model, encoder → decoder) and checks them against the tensor names. ``block`` is a block's
index in the chain of all stacks (the pipeline); ``stack`` and ``stack_index`` say which stack and which block
of it; ``role`` is ``first``/``block``/``between``/``last``/``mtp`` (``between`` modules and blocks have
placement ``block``; ``mtp`` layers travel with the last stage).

Compute model (GFLOPs of one forward pass over ``B·S`` tokens): `williw.compute` prices each tensor from what
it is (quantized weights at their logical shape, buffers free, experts at the active fraction). Each block
adds its cores, which belong to no tensor: the attention core of a block with attention, ``QKᵀ`` and ``A·V``,
``2·B·S²·hidden`` each, so ``4·B·S²·hidden`` per attention (self, and cross in a decoder; the PaLM paper,
appendix B, counts the same ``6·L·H·Q·T`` term for training = 3× forward), and the selective scan of a
state-space block (`williw.compute.ssm_core_flops`). A tied LM head (the input token table reused,
`tied_head_tensors`) costs ``2·B·S·vocab·hidden`` on the last stage. Run-time memory per block (KV cache, state,
activations): `williw.memory`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from williw.checkpoint import Checkpoint, open_checkpoint
from williw.classify import TensorFacts, layer_type, quantizable_names
from williw.compute import CROSS_ATTENTION, CostModel, TensorCost, keys_attended, ssm_core_flops, stack_hidden
from williw.config import ModelConfig
from williw.errors import MetadataError
from williw.fsutil import read_json, write_json
from williw.memory import block_memory, compute_dtype, element_bytes
from williw.structure import Structure, find_structure, token_table

FORMAT_VERSION = 1
GIGA = 1e9
PLACEMENTS = ("first", "block", "last")


@dataclass(frozen=True)
class LayerMeta:
    """One tensor. ``placement`` is ``first`` (embeddings), ``block`` or ``last`` (final norm, heads)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    num_params: int
    bytes: int
    compute_required: float  # GFLOPs
    layer_type: str
    block: int | None
    placement: str
    file: str
    stack: str | None = None  # the stack of a block (or of a module between stacks)
    stack_index: int | None = None  # the block's index within its stack
    role: str | None = None  # first, block, between, last, mtp (None in files written before stacks)
    note: str | None = None  # quantized, quant_state, buffer, experts, tied: why params/compute are not shape-based
    # A weight-only quantizer converts it (`williw.classify.quantizable`): a block's nn.Linear weight, [out, in].
    quantizable: bool = False


@dataclass(frozen=True)
class BlockMeta:
    """A transformer block: its tensors' totals; ``compute`` includes ``attention_compute`` (the S² core)."""

    index: int
    tensors: int
    params: int
    bytes: int
    compute: float  # GFLOPs
    attention_compute: float  # GFLOPs
    stack: str | None = None
    stack_index: int | None = None
    state_space_compute: float = 0.0  # GFLOPs of the selective scan (Mamba blocks)
    kv_bytes_per_token: int = 0  # run-time memory: `williw.memory.BlockMemory` (0 in files written before it)
    kv_window: int = 0
    state_bytes: int = 0
    activation_bytes_per_token: int = 0


@dataclass(frozen=True)
class TiedHead:
    """An output head that reuses ``tensor`` (the input embedding); it runs, and needs that tensor, last."""

    tensor: str
    compute_required: float  # GFLOPs
    bytes: int


@dataclass(frozen=True)
class ModelMetadata:
    format_version: int
    model_name: str
    model_type: str
    architecture: str | None
    checkpoint_format: str
    batch_size: int
    sequence_length: int
    hidden_size: int | None
    layers: tuple[LayerMeta, ...]
    blocks: tuple[BlockMeta, ...]
    tied_lm_head: TiedHead | None
    total_compute: float  # GFLOPs
    total_params: int
    total_bytes: int
    total_layers: int
    stacks: tuple[dict[str, Any], ...] = ()  # williw.structure.Stack.to_dict(), in execution order
    ignored_files: tuple[str, ...] = ()  # weight-like files of the folder that are not the checkpoint
    commit: str | None = None  # the Hub commit the headers were read at (remote metadata); None for a folder
    # What reading derived rather than found (seed-format metadata, see `williw.seedformat`); not written out.
    notes: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    element_bytes: int = 2  # bytes of one activation or cache element (`williw.memory.element_bytes`)
    # The config's dtype, which ``element_bytes`` and the blocks' KV and activation figures are priced at; None when
    # the config names none (and in files written before it): those figures are then taken as written on any node.
    compute_dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("notes")
        for layer in d["layers"]:
            layer["shape"] = list(layer["shape"])
        d["compute_unit"] = "GFLOPs"
        return d

    @staticmethod
    def from_dict(d: Any, source: str = "metadata") -> ModelMetadata:
        """Validate a metadata dict (as loaded from JSON).

        Raises:
            MetadataError: one line naming ``source``, the field and what was expected.
        """
        from williw.metadata_read import parse_metadata

        return parse_metadata(d, source)


def generate_metadata(model: str | os.PathLike[str] | Checkpoint, *, model_name: str | None = None,
                      batch_size: int = 1, sequence_length: int = 512) -> ModelMetadata:
    """Build the metadata of a model from its headers and ``config.json``.

    Args:
        model: a model folder, a weights file, or an already opened `Checkpoint` (a remote one from
            `williw.remote_checkpoint.open_remote_checkpoint`: then ``commit`` is recorded too).
        model_name: the name recorded in the JSON (default: the folder name, or the repo id).
        batch_size, sequence_length: the forward pass the compute estimates are for.

    Raises:
        CheckpointError: the folder or a weights file is missing or corrupt.
        MetadataError: batch size or sequence length is not a positive integer.
    """
    for field, value in (("batch_size", batch_size), ("sequence_length", sequence_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MetadataError(f"{field} must be a positive integer, got {value!r}")
    ckpt = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    cfg = ckpt.config
    raw = cfg.raw if cfg else {}
    tokens = batch_size * sequence_length
    names = [t.name for t in ckpt.tensors]
    shapes = {t.name: t.shape for t in ckpt.tensors}
    structure = find_structure(names, raw or None, ckpt.label("config.json"), shapes)
    table, copies = tied_head_tensors(cfg, structure, shapes)
    costs = CostModel(raw, set(names), tokens)
    model_type = cfg.model_type if cfg and cfg.model_type else "transformer"
    ssm_mixers = {n.rsplit(".", 1)[0] + "." for n in names if n.endswith(".A_log")}
    layers, flops = [], {}
    for t in ckpt.tensors:
        kind = "ssm" if any(t.name.startswith(m) for m in ssm_mixers) else layer_type(t.name)
        cost = TensorCost(0, 0, "tied") if t.name in copies else costs.cost(t.name, t.shape, t.dtype, kind)
        flops[t.name] = cost.flops
        layers.append(_layer(t, kind, cost.params, cost.flops, cost.note, structure))
    quant = quantizable_names(map(facts, layers), model_type)
    layers = sorted((dataclasses.replace(x, quantizable=x.name in quant) for x in layers), key=_model_order)

    hidden = cfg.hidden_size if cfg and cfg.hidden_size else _guess_hidden(layers)
    blocks, block_flops = _blocks(layers, flops, hidden, batch_size, sequence_length, raw, structure)
    tied, tied_flops = _tied_head(table, layers, tokens)
    total_compute = (sum(flops.values()) + block_flops + tied_flops) / GIGA
    return ModelMetadata(
        format_version=FORMAT_VERSION,
        model_name=model_name or ckpt.location or ckpt.path.resolve().name,
        model_type=model_type,
        architecture=cfg.architecture if cfg else None,
        checkpoint_format=ckpt.format,
        batch_size=batch_size,
        sequence_length=sequence_length,
        hidden_size=hidden,
        layers=tuple(layers),
        blocks=tuple(blocks),
        tied_lm_head=tied,
        total_compute=total_compute,
        total_params=sum(x.num_params for x in layers),
        total_bytes=sum(x.bytes for x in layers),
        total_layers=len(layers),
        stacks=tuple(s.to_dict() for s in structure.stacks),
        ignored_files=ckpt.ignored,
        commit=ckpt.commit,
        element_bytes=element_bytes(raw),
        compute_dtype=compute_dtype(raw),
    )


def facts(x: LayerMeta) -> TensorFacts:
    """What `williw.classify.quantizable_names` reads of a tensor."""
    return TensorFacts(x.name, x.shape, x.dtype, x.layer_type, x.placement, x.role, x.note)


def _layer(t: Any, kind: str, params: int, flops: int, note: str | None, structure: Structure) -> LayerMeta:
    place = structure.place(t.name)
    placement = {"first": "first", "block": "block", "between": "block"}.get(place.role, "last")
    return LayerMeta(name=t.name, shape=t.shape, dtype=t.dtype, num_params=params, bytes=t.nbytes,
                     compute_required=flops / GIGA, layer_type=kind, block=place.block, placement=placement,
                     file=t.file, stack=place.stack, stack_index=place.index, role=place.role, note=note)


def _model_order(layer: LayerMeta) -> tuple[int, int, int, str]:
    between = 0 if layer.role != "between" or layer.stack_index is not None else 1
    return PLACEMENTS.index(layer.placement), layer.block if layer.block is not None else -1, between, layer.name


def _guess_hidden(layers: list[LayerMeta]) -> int | None:
    emb = [x for x in layers if x.layer_type == "embedding" and len(x.shape) == 2]
    return max(emb, key=lambda x: x.num_params).shape[1] if emb else None


def _blocks(layers: list[LayerMeta], flops: dict[str, int], hidden: int | None, batch: int, seq: int,
            cfg: dict[str, Any], structure: Structure) -> tuple[list[BlockMeta], int]:
    """The blocks' summaries, and the FLOPs of all attention and scan cores (which belong to no tensor)."""
    grouped: dict[int, list[LayerMeta]] = {}
    for x in layers:
        if x.block is not None:
            grouped.setdefault(x.block, []).append(x)
    hidden_of = {s.part: stack_hidden(cfg, s.part) or hidden for s in structure.stacks}
    blocks, cores = [], 0
    for index in sorted(grouped):
        members = grouped[index]
        stack = next((x.stack for x in members if x.role == "block"), None)
        h = hidden_of.get(stack or "", hidden) or 0
        attention = [x for x in members if x.layer_type == "attention" and len(x.shape) >= 2 and x.note is None
                     or x.note == "quantized" and x.layer_type == "attention"]
        cross = any(c in x.name.lower() for x in attention for c in CROSS_ATTENTION)
        spec = next((s for s in structure.stacks if s.part == stack), None)
        in_stack = next((x.stack_index for x in members if x.role == "block"), None)
        keys = keys_attended(spec.layer_types if spec else None, in_stack, cfg, seq)
        core = (1 + cross) * 4 * batch * seq * keys * h if attention else 0
        a_log = next((x.shape for x in members if x.name.endswith(".A_log")), None)
        scan = ssm_core_flops(a_log, cfg, batch * seq) if a_log is not None else 0
        kind = spec.layer_types[in_stack] if spec and spec.layer_types and in_stack is not None else None
        mem = block_memory(cfg, kind, attention=bool(attention) and stack not in ("vision", "encoder"), a_log=a_log,
                           hidden=h)
        cores += core + scan
        blocks.append(BlockMeta(index=index, tensors=len(members), params=sum(x.num_params for x in members),
                                bytes=sum(x.bytes for x in members),
                                compute=(sum(flops[x.name] for x in members) + core + scan) / GIGA,
                                attention_compute=core / GIGA, stack=stack,
                                stack_index=in_stack,
                                state_space_compute=scan / GIGA, **asdict(mem)))
    return blocks, cores


def tied_head_tensors(cfg: ModelConfig | None, structure: Structure,
                      shapes: Mapping[str, tuple[int, ...]]) -> tuple[str | None, tuple[str, ...]]:
    """The input token table that the output head reuses when the config ties them (`williw.structure.token_table`),
    and the stored heads that are copies of it; ``(None, ())`` when the head is not tied.

    With ``tie_word_embeddings`` true, transformers 5 makes the head's weight the input embedding's
    (``_tied_weights_keys``); a stored ``lm_head.weight`` of the same shape is loaded, then replaced by the tie when
    its values equal the table's (``tie_weights`` during ``from_pretrained``, by ``torch.equal``), so the model never
    uses it: it is a copy, owned by the last stage like a head, neither parameters nor compute (note ``tied``).
    Headers cannot compare values; the split does, and refuses a stored head that differs, which transformers would
    run untied (`williw.splitter.check_tied_copies`). A stored head of another shape is not tied.
    """
    if cfg is None or not cfg.has_lm_head or not cfg.tie_word_embeddings:
        return None, ()
    table = token_table(structure, shapes, cfg.raw)
    if table is None:
        return None, ()
    heads = tuple(n for n, s in shapes.items()
                  if len(s) == 2 and layer_type(n) == "lm_head" and structure.place(n).role == "last")
    if any(shapes[n] != shapes[table] for n in heads):
        return None, ()
    return table, heads


def _tied_head(table: str | None, layers: list[LayerMeta], tokens: int) -> tuple[TiedHead | None, int]:
    if table is None:
        return None, 0
    x = next(x for x in layers if x.name == table)
    flops = 2 * tokens * x.num_params
    return TiedHead(tensor=x.name, compute_required=flops / GIGA, bytes=x.bytes), flops


def save_metadata(meta: ModelMetadata, path: str | os.PathLike[str]) -> None:
    """Write the metadata JSON atomically."""
    write_json(path, meta.to_dict())


def load_metadata(path: str | os.PathLike[str]) -> ModelMetadata:
    """Read and validate a metadata JSON file.

    Raises:
        MetadataError: missing file, invalid JSON, or a field with a wrong type or value (named in the message).
    """
    path = Path(path)
    data = read_json(path, MetadataError, "no such metadata file")
    return ModelMetadata.from_dict(data, str(path))
