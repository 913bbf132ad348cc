"""What a node runs its stage in: the device, the compute dtype and the weight format, and what that costs in bytes.

Torch-free (the planner and the worker use it); `williw.quantize` applies it to a stage, `williw.devices` picks the
device and dtype a node has.

Weight formats (``weights``):

- ``as-stored``: every tensor at the node's compute dtype (``float32``, ``bfloat16``, ``float16``).
- ``int8``: weight-only, per output channel: each ``nn.Linear`` weight ``[N, K]`` of the stage's blocks becomes
  int8 ``[N, K]`` and one scale per row at the compute dtype (``w ≈ q · s``, ``s = max|w_row| / 127``), run by
  torch's own ``_weight_int8pack_mm`` (CPU, CUDA, MPS).
- ``int4``: weight-only, group-wise asymmetric: groups of ``g`` inputs (128, else the largest of 256, 64, 32 that
  divides K) with a scale and a zero each (``w ≈ (q - 8) · s + z``, q in [0, 15]), packed two to a byte and run by
  ``_weight_int4pack_mm_for_cpu`` on CPU and tinygemm's ``_weight_int4pack_mm`` on CUDA. The kernels need
  ``N % 16 == 0``; a linear that does not fit stays at the compute dtype. int8 likewise needs ``K % 16 == 0``
  (`int8_takes`).

Embeddings, norms, the head (often tied to the embeddings), MoE expert tensors (3-D, not ``nn.Linear``), GPT-2's
``Conv1D`` and the KV cache stay at the compute dtype. Byte counts follow the kernels' layouts: int8 ``N·K + N·d``,
int4 ``N·K/2 + 2·N·(K/g)·d`` bytes, ``d`` the compute dtype's size.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DTYPES", "DTYPE_BYTES", "WEIGHTS", "Precision", "int4_group_size", "int8_takes", "linear_weight_bytes",
           "parse_weights"]

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
WEIGHTS = ("as-stored", "int8", "int4")
INT4_GROUPS = (128, 256, 64, 32)  # tried in this order: 128 is the usual choice (GPTQ, AWQ, llama.cpp's Q4_K)


@dataclass(frozen=True)
class Precision:
    """A stage's precision: ``dtype`` the compute dtype (activations, KV cache, unquantized tensors), ``weights``
    the format of its blocks' linear weights."""

    dtype: str = "float32"
    weights: str = "as-stored"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype '{self.dtype}' is not one of {', '.join(DTYPES)}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights '{self.weights}' is not one of {', '.join(WEIGHTS)}")

    @property
    def label(self) -> str:
        """``bfloat16`` or ``int8/bfloat16``: the weights, then the compute dtype."""
        return self.dtype if self.weights == "as-stored" else f"{self.weights}/{self.dtype}"


def int4_group_size(out_features: int, in_features: int) -> int | None:
    """The int4 group size of a linear weight ``[out_features, in_features]``, or None when the kernels cannot
    take it (``out_features % 16``, or no group size in 32-256 divides ``in_features``)."""
    if out_features % 16:
        return None
    return next((g for g in INT4_GROUPS if in_features % g == 0), None)


def int8_takes(out_features: int, in_features: int) -> bool:
    """Whether int8 takes a linear weight ``[out_features, in_features]``: torch 2.13's CPU
    ``_weight_int8pack_mm`` reads past the row with bfloat16 activations when ``in_features % 16`` (NaN, Inf or a
    segfault, found by a breaker at widths 8, 24, 40, 100), so the runtime keeps such a linear at the compute dtype.
    `linear_weight_bytes` still counts it as int8: the planner's certified search assumes int4 <= int8 <= as-stored
    block by block, and hypothesis found its bounds wrong once int8 did not hold for some widths (a known limit in
    the README; real models' widths are multiples of 64)."""
    return in_features % 16 == 0


def linear_weight_bytes(shape: tuple[int, ...], weights: str, dtype: str) -> int:
    """Bytes a linear weight of ``shape`` (``[N, K]``) takes on a node in format ``weights`` at compute ``dtype``
    (int8: ``N·K`` + a scale per row; int4: ``N·K / 2`` + a scale and a zero per group; else ``N·K`` at
    ``dtype``). A weight the format cannot take counts at ``dtype``."""
    d = DTYPE_BYTES[dtype]
    n, k = shape[0], 1
    for s in shape[1:]:
        k *= s
    if weights == "int8" and len(shape) == 2:  # int8_takes is the runtime's (see its docstring)
        return n * k + n * d
    if weights == "int4" and len(shape) == 2:
        g = int4_group_size(n, k)
        if g is not None:
            return n * k // 2 + 2 * n * (k // g) * d
    return n * k * d


def parse_weights(value: str) -> tuple[str, ...]:
    """``"int8"``, ``"int4,int8"`` or ``"auto"`` (every format, highest precision first) as a tuple of formats.

    Raises:
        ValueError: a format that is not one of `WEIGHTS` (the message names it).
    """
    if value == "auto":
        return WEIGHTS
    out = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in out if v not in WEIGHTS]
    if bad or not out:
        raise ValueError(f"weights '{value}': expected auto or a comma-separated list of {', '.join(WEIGHTS)}")
    return tuple(w for w in WEIGHTS if w in out)  # highest precision first
