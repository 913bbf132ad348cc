"""The one dtype table and the formatting of sizes and FLOPs."""

from __future__ import annotations

# Bits per element of every dtype safetensors knows (safetensors `Dtype`, 0.6). Sub-byte types (F4, F6) are
# packed, so a tensor's byte size is numel * bits / 8 and must be whole.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

# torch dtype name (str(torch.float32) without the "torch." prefix) -> safetensors dtype code.
TORCH_TO_SAFETENSORS: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e8m0fnu": "F8_E8M0",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "complex64": "C64",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
}
SAFETENSORS_TO_TORCH: dict[str, str] = {v: k for k, v in TORCH_TO_SAFETENSORS.items()}

FLOAT_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F16", "BF16", "F32", "F64"})


def numel(shape: tuple[int, ...] | list[int]) -> int:
    """Number of elements of a tensor of this shape (1 for a scalar)."""
    n = 1
    for dim in shape:
        n *= dim
    return n


def tensor_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int | None:
    """Bytes of a tensor, or None when the dtype is unknown or a sub-byte tensor does not fill whole bytes."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        return None
    total_bits = numel(shape) * bits
    if total_bits % 8:
        return None
    return total_bits // 8


def format_bytes(n: float) -> str:
    """Decimal units, like ``memory_gb`` (GB = 1e9 bytes): 2.20 GB, 350.00 MB, 4,096 bytes."""
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e5:
        return f"{n / 1e6:.2f} MB"
    return f"{int(n):,} bytes"


def format_gflops(gflops: float) -> str:
    """GFLOPs with a prefix that keeps 3-4 significant digits, e.g. 2.25 TFLOPs."""
    if abs(gflops) >= 1000:
        return f"{gflops / 1000:.2f} TFLOPs"
    return f"{gflops:.2f} GFLOPs"


def format_seconds(s: float) -> str:
    """4.56 s, 12.3 ms, 45.6 µs: planned stage times of small models are microseconds."""
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.1f} µs"
