"""Weight-only int8 and int4 linear layers on torch's own kernels, and the device move of a stage.

The formats and their byte counts are `williw.precision`'s. The kernels ship inside the pinned torch (no download):
``torch._weight_int8pack_mm`` (CPU, CUDA, MPS), ``torch._weight_int4pack_mm_for_cpu`` and tinygemm's
``torch._weight_int4pack_mm`` (CUDA). Why not torchao's configurations: measured here (2 threads, a 2048 x 2048
matrix-vector product in bfloat16), torchao 0.18's ``Int8WeightOnlyConfig`` took 0.78 ms through its tensor
subclass's eager dispatch (torchao#1930), the kernel called directly 0.12 ms (bfloat16 itself: 0.30 ms, float32:
0.46-0.55 ms); its int4 CPU layout ("opaque") was not in the wheel the registry serves, and importing it printed
two "Failed to load" lines on the user's terminal. What williw writes is the rounding (per row or per group, as
below), 40 lines; the arithmetic is torch's.

The same functions convert the whole model in `williw.verify` and in tests, so a quantized stage and the whole
model quantized the same way give the same bits on the CPU.

torch is imported inside the functions (it is an extra).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from williw.precision import int4_group_size, int8_takes

if TYPE_CHECKING:
    import torch

__all__ = ["quantize_linears", "to_device"]


def _int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and one scale per row (symmetric: ``w ≈ q · s``, ``s = max|w_row| / 127``)."""
    import torch

    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values 0..15 ``[N, K]`` (int32) and scales and zeros ``[K / group, N, 2]`` (float32): per group of ``group``
    inputs, ``w ≈ (q - 8) · s + z`` with ``s = (max - min) / 15`` and ``z = min + 8 s`` (the kernels' layout)."""
    import torch

    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((w - low) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = low + 8 * scale
    return q, torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1).contiguous()


def _linear_classes() -> tuple[type, type]:
    import torch

    class Int8Linear(torch.nn.Module):
        """``y = x Wᵀ + b`` with W int8 per row (``torch._weight_int8pack_mm``); x at the scales' dtype."""

        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            q, scale = _int8(linear.weight.detach())
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.register_buffer("weight_int8", q)
            self.register_buffer("scales", scale.to(linear.weight.dtype))
            self.bias = linear.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight_int8, self.scales)
            y = y.reshape(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias

    class Int4Linear(torch.nn.Module):
        """``y = x Wᵀ + b`` with W int4 group-wise, packed for the device's kernel."""

        def __init__(self, linear: torch.nn.Linear, group: int, device: str) -> None:
            super().__init__()
            q, scales_zeros = _int4(linear.weight.detach(), group)
            self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
            self.on_cuda = device.startswith("cuda")
            if self.on_cuda:  # tinygemm: two values a byte, high nibble first, 8 inner k-tiles, packed on the GPU
                pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
                packed = torch._convert_weight_to_int4pack(pairs, 8)
            else:
                packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            self.register_buffer("weight_int4", packed)
            self.register_buffer("scales_zeros", scales_zeros.to(linear.weight.dtype))
            self.bias = linear.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            flat = x.reshape(-1, shape[-1])
            if self.on_cuda:
                y = torch._weight_int4pack_mm(flat, self.weight_int4, self.group, self.scales_zeros)
            else:
                y = torch._weight_int4pack_mm_for_cpu(flat, self.weight_int4, self.group, self.scales_zeros)
            y = y.reshape(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias

    return Int8Linear, Int4Linear


def quantize_linears(modules: Iterable[Any], weights: str, *, device: str = "cpu") -> dict[str, int]:
    """Replace every ``nn.Linear`` inside ``modules`` (a stage's own blocks) by its int8 or int4 form, in place.

    Args:
        modules: the modules to convert, already at the compute dtype (the scales take it).
        weights: ``int8`` or ``int4`` (`williw.precision.WEIGHTS`; ``as-stored`` converts nothing).
        device: where the stage will run; int4 is packed for CUDA's kernel there.

    Returns:
        ``{"int8": n, "int4": n, "kept": n}``: linears converted, and those the format cannot take (kept as they
        were: `williw.precision.int8_takes`, `int4_group_size`).

    Raises:
        ValueError: int4 on MPS (torch has no int4 kernel for it), or on CUDA at a dtype other than bfloat16.
    """
    import torch

    modules = list(modules)
    if weights == "as-stored":
        return {"int8": 0, "int4": 0, "kept": 0}
    if weights == "int4" and device.startswith("mps"):
        raise ValueError("int4 weights need torch's CPU or CUDA int4 kernels; on MPS use int8 or as-stored")
    dtypes = {p.dtype for m in modules for p in m.parameters() if p.is_floating_point()}
    if weights == "int4" and device.startswith("cuda") and dtypes - {torch.bfloat16}:
        raise ValueError("int4 weights on CUDA need bfloat16 compute (tinygemm's kernel takes bfloat16 "
                         "activations only); use --dtype bfloat16")
    int8_cls, int4_cls = _linear_classes()
    counts = {"int8": 0, "int4": 0, "kept": 0}
    for module in modules:
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear or child.weight.is_meta:
                    continue
                group = int4_group_size(child.out_features, child.in_features) if weights == "int4" else None
                if weights == "int8" and int8_takes(child.out_features, child.in_features):
                    setattr(parent, name, int8_cls(child))
                    counts["int8"] += 1
                elif group is not None:
                    setattr(parent, name, int4_cls(child, group, device))
                    counts["int4"] += 1
                else:
                    counts["kept"] += 1
    return counts


def to_device(model: Any, device: str) -> None:
    """Move a stage's tensors to ``device``; a placeholder (a zero-stride stand-in for another stage's tensor)
    becomes a placeholder there, never a full-size copy."""
    import torch

    if device == "cpu":
        return
    moved_once: dict[int, Any] = {}  # a tied tensor stays one tensor
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for n, t in list(store.items()):
                if t is None or t.is_meta:
                    continue
                if id(t) in moved_once:
                    store[n] = moved_once[id(t)]
                    continue
                if getattr(t, "_williw_placeholder", False):
                    moved = torch.zeros((), dtype=t.dtype, device=device).expand(t.shape)
                    moved = torch.nn.Parameter(moved, requires_grad=False) if store is module._parameters \
                        else moved
                    moved._williw_placeholder = True  # type: ignore[attr-defined]
                else:
                    moved = t.to(device)
                    if store is module._parameters:
                        moved = torch.nn.Parameter(moved, requires_grad=False)
                store[n] = moved_once[id(t)] = moved
