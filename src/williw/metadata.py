"""Metadata: every tensor with its block, layer type, bytes and estimated compute; JSON in and out.

The JSON keeps the seed's fields (``model_name``, ``model_type``, ``batch_size``, ``sequence_length``,
``layers[]`` with ``name, shape, num_params, compute_required, layer_type, dtype``, ``total_compute``,
``total_layers``) and adds what planning needs: per tensor ``bytes``, ``block`` and ``placement``, a ``blocks[]``
summary, totals, ``architecture``, the tied LM head, and ``format_version``.

Compute model: GFLOPs of one forward pass over ``B·S`` tokens (B = batch size, S = sequence length).
  * matrix weight (≥ 2 dims, not an embedding): ``2·B·S·params`` — one multiply-add per weight per token
    (Kaplan et al. 2020, "Scaling Laws", table 1: C_forward ≈ 2N);
  * embedding table: 0 — a lookup is a gather, not a matmul (the seed priced it as a matmul);
  * bias: ``B·S·params`` (one add); norm weight: ``4·B·S·params`` (mean/variance, normalise, scale);
  * integer buffers (``position_ids``, masks): 0;
  * tied LM head (no ``lm_head`` tensor stored, the embedding reused): ``2·B·S·vocab·hidden``, on the last stage;
  * attention core of each block that has attention: ``QKᵀ`` and ``A·V``, ``2·B·S²·hidden`` each, so
    ``4·B·S²·hidden`` (the PaLM paper, appendix B, counts the same ``6·L·H·Q·T`` term for training = 3× forward),
    counted in that block, not in any tensor.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from williw.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from williw.classify import LAYER_TYPES, block_of, find_block_prefix, is_embedding_side, layer_type
from williw.errors import MetadataError
from williw.fsutil import read_json, write_json
from williw.jsonio import INT64_MAX
from williw.seedformat import derive_seed_fields, dtype_code
from williw.units import DTYPE_BITS, FLOAT_DTYPES

FORMAT_VERSION = 1
NORM_FLOPS_PER_ELEMENT = 4
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


@dataclass(frozen=True)
class BlockMeta:
    """A transformer block: its tensors' totals; ``compute`` includes ``attention_compute`` (the S² core)."""

    index: int
    tensors: int
    params: int
    bytes: int
    compute: float  # GFLOPs
    attention_compute: float  # GFLOPs


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
    # What reading derived rather than found (seed-format metadata, see `williw.seedformat`); not written out.
    notes: tuple[str, ...] = dataclasses.field(default=(), compare=False)

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
        return _parse(d, source)


def generate_metadata(model: str | os.PathLike[str] | Checkpoint, *, model_name: str | None = None,
                      batch_size: int = 1, sequence_length: int = 512) -> ModelMetadata:
    """Build the metadata of a local model folder from its headers and ``config.json``.

    Args:
        model: a model folder, a weights file, or an already opened `Checkpoint`.
        model_name: the name recorded in the JSON (default: the folder name).
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
    tokens = batch_size * sequence_length
    prefix = find_block_prefix(t.name for t in ckpt.tensors)
    flops = {t.name: tensor_flops(t.name, t.shape, t.dtype, layer_type(t.name), tokens) for t in ckpt.tensors}
    layers = [_layer(t, prefix, flops[t.name]) for t in ckpt.tensors]
    layers.sort(key=_model_order)

    hidden = cfg.hidden_size if cfg and cfg.hidden_size else _guess_hidden(layers)
    blocks, block_flops = _blocks(layers, flops, hidden, batch_size, sequence_length)
    tied, tied_flops = _tied_head(ckpt, layers, tokens)
    total_compute = (sum(flops.values()) + block_flops + tied_flops) / GIGA
    return ModelMetadata(
        format_version=FORMAT_VERSION,
        model_name=model_name or ckpt.path.resolve().name,
        model_type=(cfg.model_type if cfg and cfg.model_type else "transformer"),
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
    )


def tensor_flops(name: str, shape: tuple[int, ...], dtype: str, kind: str, tokens: int) -> int:
    """Forward FLOPs of one tensor over ``tokens`` tokens, by the compute model of this module.

    Integers, so that totals are exact sums divided once by 1e9.
    """
    n = math.prod(shape)
    if dtype not in FLOAT_DTYPES or kind == "embedding":
        return 0
    if len(shape) >= 2:
        return 2 * tokens * n
    if kind == "norm" and not name.endswith("bias"):
        return NORM_FLOPS_PER_ELEMENT * tokens * n
    return tokens * n


def _layer(t: TensorInfo, prefix: str | None, flops: int) -> LayerMeta:
    kind = layer_type(t.name)
    block = block_of(t.name, prefix)
    placement = "block" if block is not None else ("first" if is_embedding_side(t.name) and kind != "lm_head"
                                                   else "last")
    return LayerMeta(name=t.name, shape=t.shape, dtype=t.dtype, num_params=t.numel, bytes=t.nbytes,
                     compute_required=flops / GIGA, layer_type=kind,
                     block=block, placement=placement, file=t.file)


def _model_order(layer: LayerMeta) -> tuple[int, int, str]:
    rank = PLACEMENTS.index(layer.placement)
    return rank, layer.block if layer.block is not None else -1, layer.name


def _guess_hidden(layers: list[LayerMeta]) -> int | None:
    emb = [x for x in layers if x.layer_type == "embedding" and len(x.shape) == 2]
    return max(emb, key=lambda x: x.num_params).shape[1] if emb else None


def _blocks(layers: list[LayerMeta], flops: dict[str, int], hidden: int | None, batch: int,
            seq: int) -> tuple[list[BlockMeta], int]:
    """The blocks' summaries, and the FLOPs of all attention cores (which belong to no tensor)."""
    grouped: dict[int, list[LayerMeta]] = {}
    for x in layers:
        if x.block is not None:
            grouped.setdefault(x.block, []).append(x)
    blocks = []
    cores = 0
    for index in sorted(grouped):
        members = grouped[index]
        has_attention = any(x.layer_type == "attention" and len(x.shape) >= 2 for x in members)
        core = 4 * batch * seq * seq * hidden if has_attention and hidden else 0
        cores += core
        blocks.append(BlockMeta(index=index, tensors=len(members), params=sum(x.num_params for x in members),
                                bytes=sum(x.bytes for x in members),
                                compute=(sum(flops[x.name] for x in members) + core) / GIGA,
                                attention_compute=core / GIGA))
    return blocks, cores


def _tied_head(ckpt: Checkpoint, layers: list[LayerMeta], tokens: int) -> tuple[TiedHead | None, int]:
    cfg = ckpt.config
    if cfg is None or not cfg.has_lm_head or not cfg.tie_word_embeddings:
        return None, 0
    if any(x.layer_type == "lm_head" for x in layers):
        return None, 0
    emb = [x for x in layers if x.layer_type == "embedding" and len(x.shape) == 2 and x.placement == "first"]
    if not emb:
        return None, 0
    # The output head reuses the token table: the one with vocab_size rows (not, say, GPT-2's position table).
    vocab = [x for x in emb if cfg.vocab_size and x.shape[0] == cfg.vocab_size]
    table = max(vocab or emb, key=lambda x: x.num_params)
    flops = 2 * tokens * table.num_params
    return TiedHead(tensor=table.name, compute_required=flops / GIGA, bytes=table.bytes), flops


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
    return _parse(data, str(path))


class _Fields:
    """Typed access to a JSON object, raising one-line errors with the field's path."""

    def __init__(self, obj: Any, source: str, where: str) -> None:
        if not isinstance(obj, dict):
            raise MetadataError(f"'{source}': {where or 'the top level'} must be an object")
        self.obj, self.source, self.where = obj, source, where

    def _fail(self, key: str, expected: str, value: Any) -> MetadataError:
        path = f"{self.where}.{key}" if self.where else key
        text = repr(value)
        text = text if len(text) <= 60 else f"{text[:40]}... ({len(text):,} characters)"
        return MetadataError(f"'{self.source}': field '{path}' expected {expected}, got {text}")

    def get(self, key: str, kind: str, *, optional: bool = False, default: Any = None) -> Any:
        if key not in self.obj or self.obj[key] is None:
            if optional:
                return default
            path = f"{self.where}.{key}" if self.where else key
            raise MetadataError(f"'{self.source}': missing field '{path}'")
        value = self.obj[key]
        ok = {
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX,
            "posint": isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= INT64_MAX,
            "num": isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= MAX_GFLOPS,
            "list": isinstance(value, list),
        }[kind]
        if not ok:
            too_big = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            expected = {"str": "a string", "int": "an integer >= 0", "posint": "an integer >= 1",
                        "num": "a finite number >= 0", "list": "a list"}[kind]
            if too_big and kind != "str" and kind != "list":
                expected += f" and <= {MAX_GFLOPS:g}" if kind == "num" else f" and <= {INT64_MAX} (int64)"
            raise self._fail(key, expected, value)
        return value


# A field of compute (GFLOPs) is at most 1e18 (1e27 FLOP: a 10^12-parameter model over 10^13 tokens); summed
# over 10^6 tensors and divided by the smallest compute a node may claim (1e-6 TFLOPS) it stays finite.
MAX_GFLOPS = 1e18


def _parse(d: Any, source: str) -> ModelMetadata:
    d, note = derive_seed_fields(d, source)
    top = _Fields(d, source, "")
    version = top.get("format_version", "posint", optional=True, default=FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise MetadataError(f"'{source}': format_version {version} is newer than this williw reads "
                            f"({FORMAT_VERSION}); upgrade williw")
    layers = []
    for i, raw in enumerate(top.get("layers", "list")):
        f = _Fields(raw, source, f"layers[{i}]")
        shape = f.get("shape", "list")
        if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= INT64_MAX for s in shape):
            raise f._fail("shape", "a list of integers in [0, 2^63-1]", shape)
        dtype = dtype_code(f.get("dtype", "str"))
        if dtype not in DTYPE_BITS:
            raise f._fail("dtype", f"a safetensors dtype ({', '.join(DTYPE_BITS)}) or a torch one ('torch.float32')",
                          dtype)
        kind = f.get("layer_type", "str", optional=True, default="other")
        if kind not in LAYER_TYPES:
            raise f._fail("layer_type", f"one of {', '.join(LAYER_TYPES)}", kind)
        block = f.get("block", "int", optional=True)
        placement = f.get("placement", "str", optional=True, default="block" if block is not None else "last")
        if placement not in PLACEMENTS or (placement == "block") != (block is not None):
            raise f._fail("placement", "'block' exactly when 'block' is set, else 'first' or 'last'", placement)
        layers.append(LayerMeta(name=f.get("name", "str"), shape=tuple(shape), dtype=dtype,
                                num_params=f.get("num_params", "int"), bytes=f.get("bytes", "int"),
                                compute_required=float(f.get("compute_required", "num")), layer_type=kind,
                                block=block, placement=placement, file=f.get("file", "str", optional=True,
                                                                              default="")))
    names = [x.name for x in layers]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MetadataError(f"'{source}': tensor '{dup}' appears more than once in 'layers'")
    blocks = []
    for i, raw in enumerate(top.get("blocks", "list", optional=True, default=[])):
        f = _Fields(raw, source, f"blocks[{i}]")
        blocks.append(BlockMeta(index=f.get("index", "int"), tensors=f.get("tensors", "int"),
                                params=f.get("params", "int"), bytes=f.get("bytes", "int"),
                                compute=float(f.get("compute", "num")),
                                attention_compute=float(f.get("attention_compute", "num", optional=True,
                                                              default=0.0))))
    if {b.index for b in blocks} != {x.block for x in layers if x.block is not None}:
        raise MetadataError(f"'{source}': 'blocks' does not list exactly the blocks named in 'layers'")
    tied = None
    if d.get("tied_lm_head") is not None:
        f = _Fields(d["tied_lm_head"], source, "tied_lm_head")
        tied = TiedHead(tensor=f.get("tensor", "str"), compute_required=float(f.get("compute_required", "num")),
                        bytes=f.get("bytes", "int"))
        if tied.tensor not in names:
            raise f._fail("tensor", "the name of a tensor in 'layers'", tied.tensor)
    return ModelMetadata(
        format_version=version,
        model_name=top.get("model_name", "str"),
        model_type=top.get("model_type", "str", optional=True, default="transformer"),
        architecture=top.get("architecture", "str", optional=True),
        checkpoint_format=top.get("checkpoint_format", "str", optional=True, default="safetensors"),
        batch_size=top.get("batch_size", "posint"),
        sequence_length=top.get("sequence_length", "posint"),
        hidden_size=top.get("hidden_size", "posint", optional=True),
        layers=tuple(layers),
        blocks=tuple(sorted(blocks, key=lambda b: b.index)),
        tied_lm_head=tied,
        total_compute=float(top.get("total_compute", "num")),
        total_params=top.get("total_params", "int", optional=True, default=sum(x.num_params for x in layers)),
        total_bytes=top.get("total_bytes", "int", optional=True, default=sum(x.bytes for x in layers)),
        total_layers=top.get("total_layers", "int", optional=True, default=len(layers)),
        notes=(note,) if note else (),
    )
