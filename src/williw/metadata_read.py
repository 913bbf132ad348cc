"""Reading metadata JSON back: every field checked, one line naming the file, the field and what was expected.

Seed-format metadata (torch dtype names, no ``bytes``/``block``/``placement``) is completed first by
`williw.seedformat`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from williw.classify import LAYER_TYPES, quantizable_names
from williw.errors import MetadataError
from williw.jsonio import INT64_MAX
from williw.metadata import FORMAT_VERSION, PLACEMENTS, BlockMeta, LayerMeta, ModelMetadata, TiedHead, facts
from williw.seedformat import derive_seed_fields, dtype_code
from williw.structure import ROLES
from williw.units import DTYPE_BITS


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
_ELEMENT_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
_MEMORY_FIELDS = ("kv_bytes_per_token", "kv_window", "state_bytes", "activation_bytes_per_token")


def parse_metadata(d: Any, source: str) -> ModelMetadata:
    d, note = derive_seed_fields(d, source)
    top = _Fields(d, source, "")
    version = top.get("format_version", "posint", optional=True, default=FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise MetadataError(f"'{source}': format_version {version} is newer than this williw reads "
                            f"({FORMAT_VERSION}); upgrade williw")
    model_type = top.get("model_type", "str", optional=True, default="transformer")
    layers = []
    derive = False  # a tensor without 'quantizable' (written before it): the same rule as a checkpoint's
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
        name, role, why = f.get("name", "str"), _role(f, placement), f.get("note", "str", optional=True)
        quant = raw.get("quantizable")
        if quant is not None and not isinstance(quant, bool):
            raise f._fail("quantizable", "true or false", quant)
        derive |= quant is None
        layers.append(LayerMeta(name=name, shape=tuple(shape), dtype=dtype,
                                num_params=f.get("num_params", "int"), bytes=f.get("bytes", "int"),
                                compute_required=float(f.get("compute_required", "num")), layer_type=kind,
                                block=block, placement=placement,
                                file=f.get("file", "str", optional=True, default=""),
                                stack=f.get("stack", "str", optional=True),
                                stack_index=f.get("stack_index", "int", optional=True),
                                role=role, note=why, quantizable=bool(quant)))
    if derive:
        quant = quantizable_names(map(facts, layers), model_type)
        fields = [raw.get("quantizable") if isinstance(raw, dict) else None for raw in top.obj["layers"]]
        layers = [x if given is not None else dataclasses.replace(x, quantizable=x.name in quant)
                  for x, given in zip(layers, fields, strict=True)]
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
                                                              default=0.0)),
                                stack=f.get("stack", "str", optional=True),
                                stack_index=f.get("stack_index", "int", optional=True),
                                state_space_compute=float(f.get("state_space_compute", "num", optional=True,
                                                                default=0.0)),
                                **{k: f.get(k, "int", optional=True, default=0) for k in _MEMORY_FIELDS}))
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
        model_type=model_type,
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
        stacks=tuple(top.get("stacks", "list", optional=True, default=[])),
        ignored_files=tuple(str(x) for x in top.get("ignored_files", "list", optional=True, default=[])),
        commit=top.get("commit", "str", optional=True),
        notes=(note,) if note else (),
        element_bytes=top.get("element_bytes", "posint", optional=True, default=2),
        compute_dtype=_compute_dtype(top),
    )


def _compute_dtype(top: _Fields) -> str | None:
    value = top.get("compute_dtype", "str", optional=True)
    if value is not None and value not in _ELEMENT_BYTES:
        raise top._fail("compute_dtype", f"null or one of {', '.join(_ELEMENT_BYTES)}", value)
    if value is not None and _ELEMENT_BYTES[value] != top.get("element_bytes", "posint", optional=True,
                                                                default=_ELEMENT_BYTES[value]):
        raise top._fail("compute_dtype", f"the dtype of 'element_bytes' ({top.obj['element_bytes']})", value)
    return value


def _role(f: _Fields, placement: str) -> str | None:
    role = f.get("role", "str", optional=True)
    if role is not None and role not in ROLES:
        raise f._fail("role", f"one of {', '.join(ROLES)}", role)
    return role
