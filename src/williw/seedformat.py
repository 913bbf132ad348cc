"""Metadata in the seed's format, read like williw's own.

The seed document's metadata lists each tensor's ``name``, ``shape``, ``num_params``, ``compute_required``,
``layer_type`` and a torch ``dtype`` (``"torch.float32"``), and nothing else: no ``bytes``, ``block``,
``placement`` or ``blocks``. `derive_seed_fields` fills those in at the boundary, before validation, from what
the seed did write: bytes from shape × dtype (`williw.units.tensor_nbytes`), blocks and placement from the names
through the same steps as a checkpoint's (`williw.classify`). The metadata then validates as usual, and the
caller gets one line saying what was derived.
"""

from __future__ import annotations

import copy
from typing import Any

from williw.classify import block_of, find_block_prefix, is_embedding_side
from williw.units import DTYPE_BITS, TORCH_TO_SAFETENSORS, numel, tensor_nbytes


def dtype_code(dtype: Any) -> Any:
    """The safetensors code for a torch dtype name (``"torch.bfloat16"`` or ``"bfloat16"`` → ``"BF16"``); anything
    else unchanged (a safetensors code stays, a bad value is left for the validator to name)."""
    if not isinstance(dtype, str) or dtype in DTYPE_BITS:
        return dtype
    return TORCH_TO_SAFETENSORS.get(dtype.removeprefix("torch."), dtype)


def _shape(value: Any) -> list[int] | None:
    if isinstance(value, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        return value
    return None


def derive_seed_fields(d: Any, source: str) -> tuple[Any, str | None]:
    """Fill in what seed-format metadata leaves out; williw's own metadata comes back as it is.

    Args:
        d: the loaded metadata JSON.
        source: the file name (or ``metadata``) for the note.

    Returns:
        The metadata to validate (a copy when anything was derived) and the note, or ``(d, None)``.
    """
    if not isinstance(d, dict) or not isinstance(d.get("layers"), list) or "blocks" in d:
        return d, None
    layers = d["layers"]
    if not layers or not all(isinstance(x, dict) for x in layers):
        return d, None
    if all("bytes" in x and ("block" in x or "placement" in x) for x in layers):
        return d, None
    out = copy.deepcopy(d)
    names = [x.get("name") for x in out["layers"] if isinstance(x.get("name"), str)]
    prefix = find_block_prefix(names)
    blocks: dict[int, dict[str, Any]] = {}
    derived = set()
    for x in out["layers"]:
        x["dtype"] = dtype_code(x.get("dtype"))
        shape = _shape(x.get("shape"))
        nbytes = tensor_nbytes(x["dtype"], shape) if shape is not None and x["dtype"] in DTYPE_BITS else None
        if "bytes" not in x and nbytes is not None:
            x["bytes"] = nbytes
            derived.add("bytes")
        if "num_params" not in x and shape is not None:
            x["num_params"] = numel(shape)
            derived.add("num_params")
        name = x.get("name")
        if "block" not in x and "placement" not in x and isinstance(name, str):
            block = block_of(name, prefix)
            x["block"] = block
            x["placement"] = "block" if block is not None else "first" if is_embedding_side(name) else "last"
            derived.add("block and placement")
        if isinstance(x.get("block"), int) and not isinstance(x.get("block"), bool):
            b = blocks.setdefault(x["block"], {"index": x["block"], "tensors": 0, "params": 0, "bytes": 0,
                                               "compute": 0.0})
            b["tensors"] += 1
            for key, name_in_layer in (("params", "num_params"), ("bytes", "bytes"),
                                       ("compute", "compute_required")):
                value = x.get(name_in_layer)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    b[key] += value
    out["blocks"] = [blocks[i] for i in sorted(blocks)]
    what = ", ".join(sorted(derived)) or "the block list"
    return out, (f"'{source}': seed-format metadata: {what} derived from shapes, dtypes and names "
                 f"({len(out['layers'])} tensors, {len(blocks)} blocks)")
