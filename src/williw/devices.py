"""Which device, compute dtype and weight formats a node runs its stages in (``williw node --device --dtype
--weights``), and what that device is (its name and memory, registered with the worker).

The decision is a pure function of four facts about the machine (`Facts`: is there CUDA, how many devices, does
the one asked for compute bfloat16 natively, is there MPS), so every branch is tested without a GPU (`decide`,
`choose_device`, `choose_dtype`, `choose_weights`); `probe` reads the facts from torch. torch is imported only
when the answer can depend on it: importing it took 1.6-2.4 s on a 2-core machine, paid by every agent before it
registers, so ``auto`` on a Linux machine with no GPU device file (``/dev/nvidia*``, ROCm's ``/dev/kfd``, WSL2's
``/dev/dxg``) is CPU without asking torch, and ``cpu`` never asks.

Devices are ``cpu``, ``cuda:N`` and ``mps``; ``device_kind`` is ``cpu``, ``cuda`` or ``mps`` (what the worker and
the planner see). Dtypes and weight formats are `williw.precision`'s.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import reprlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from williw.errors import DeviceError, require_torch
from williw.precision import DTYPES, WEIGHTS, parse_weights

__all__ = ["DEVICE_KINDS", "DTYPE_SPECS", "Facts", "NodeDevice", "check_device", "check_device_spec", "check_dtype",
           "check_weights", "choose_device",
           "choose_dtype", "choose_weights", "decide", "describe_device", "device_kind", "probe", "resolve_device",
           "resolve_dtype", "resolve_node"]

DEVICE_KINDS = ("cpu", "cuda", "mps")
DEVICE_SPECS = "auto, cpu, cuda, cuda:N, mps"
DTYPE_SPECS = ("auto", *DTYPES)
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 40, 40
_SPEC = re.compile(r"^(auto|cpu|mps|cuda)(?::(0|[1-9][0-9]{0,3}))?$")
# Device files a GPU torch can use on Linux: NVIDIA's driver, ROCm's (torch.cuda on AMD), WSL2's GPU paravirtual
# device. Without any of them torch.cuda.is_available() cannot be true.
_GPU_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


@dataclass(frozen=True)
class Facts:
    """What torch says about the machine.

    Attributes:
        cuda_available: ``torch.cuda.is_available()``.
        cuda_count: ``torch.cuda.device_count()``.
        bf16_supported: the CUDA device asked for (``cuda:N``, else ``cuda:0``) computes bfloat16 natively
            (``torch.cuda.is_bf16_supported(including_emulation=False)``: compute capability 8.0 or more).
        mps_available: ``torch.backends.mps.is_available()``.
    """

    cuda_available: bool = False
    cuda_count: int = 0
    bf16_supported: bool = False
    mps_available: bool = False


@dataclass(frozen=True)
class NodeDevice:
    """What a node runs on and in: ``device`` (``cpu``, ``cuda:N``, ``mps``), its ``kind``, ``name`` and
    ``memory_bytes`` (VRAM for CUDA, RAM for CPU and for MPS's unified memory), the compute ``dtype`` and the
    weight formats it accepts, highest precision first."""

    device: str
    kind: str
    name: str
    memory_bytes: int | None
    dtype: str
    weights: tuple[str, ...]

    def registration(self) -> dict[str, Any]:
        """The fields of the worker's node registry (``POST /api/nodes``)."""
        return {"device": self.kind, "device_name": self.name, "dtype": self.dtype, "weights": list(self.weights),
                "device_memory_bytes": self.memory_bytes}


def check_device(value: Any) -> str:
    """``value`` if it is a device kind (`DEVICE_KINDS`), as a nodes file and the worker's registry hold it.

    Raises:
        ValueError: ``"must be one of cpu, cuda, mps, got 'gpu'"``.
    """
    if not isinstance(value, str) or value not in DEVICE_KINDS:
        raise ValueError(f"must be one of {', '.join(DEVICE_KINDS)}, got {_show(value)}")
    return value


def check_dtype(value: Any) -> str:
    """``value`` if it is a compute dtype (`williw.precision.DTYPES`).

    Raises:
        ValueError: ``"must be one of float32, bfloat16, float16, got 'fp16'"``.
    """
    if not isinstance(value, str) or value not in DTYPES:
        raise ValueError(f"must be one of {', '.join(DTYPES)}, got {_show(value)}")
    return value


def check_weights(value: Any) -> tuple[str, ...]:
    """``value``, a non-empty list of distinct weight formats (`williw.precision.WEIGHTS`), as a tuple with the
    highest precision first.

    Raises:
        ValueError: ``"must be a non-empty list of as-stored, int8, int4 (each at most once), got ['int3']"``.
    """
    if not isinstance(value, list | tuple) or not 0 < len(value) <= len(WEIGHTS) or not all(
            isinstance(w, str) and w in WEIGHTS for w in value) or len(set(value)) != len(value):
        raise ValueError(f"must be a non-empty list of {', '.join(WEIGHTS)} (each at most once), got {_show(value)}")
    return tuple(w for w in WEIGHTS if w in value)


def _show(value: Any) -> str:
    # Bounded: a YAML alias makes a 400-byte nodes file hold a list of 9^8 items.
    return _REPR.repr(value)


def check_device_spec(spec: str) -> str:
    """Return ``spec`` if it is ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        DeviceError: anything else.
    """
    if not isinstance(spec, str) or not _SPEC.match(spec) or ":" in spec and not spec.startswith("cuda"):
        raise DeviceError(f"device {spec!r} is not one of {DEVICE_SPECS}")
    return spec


def device_kind(device: str) -> str:
    """``cpu``, ``cuda`` or ``mps`` of a device (``cuda:1`` is ``cuda``)."""
    return device.partition(":")[0]


def choose_device(spec: str, facts: Facts) -> str:
    """The device ``spec`` means on a machine with ``facts``: ``auto`` takes CUDA (``cuda:0``), then MPS, then
    the CPU; ``cuda`` is ``cuda:0``.

    Raises:
        DeviceError: a bad spec, or a device the machine does not have (one line naming it and what torch sees).
    """
    check_device_spec(spec)
    has_cuda = facts.cuda_available and facts.cuda_count > 0
    if spec == "auto":
        return "cuda:0" if has_cuda else "mps" if facts.mps_available else "cpu"
    if spec == "mps" and not facts.mps_available:
        raise DeviceError("device 'mps' is not available here: torch sees no MPS device "
                          "(torch.backends.mps.is_available() is False); use --device cpu or auto")
    if spec.startswith("cuda"):
        if not has_cuda:
            raise DeviceError(f"device '{spec}' is not available here: torch sees no CUDA device "
                              f"(torch.cuda.is_available() is False); use --device cpu or auto")
        index = int(spec.partition(":")[2] or 0)
        if index >= facts.cuda_count:
            n = facts.cuda_count
            raise DeviceError(f"device '{spec}' is not available here: torch sees {n} CUDA "
                              f"device{'s' if n > 1 else ''} (cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})")
        return f"cuda:{index}"
    return spec


def choose_dtype(spec: str, device: str, weights: str, facts: Facts) -> str:
    """The compute dtype ``spec`` means on ``device`` for weights in format ``weights``.

    ``auto``: bfloat16 on a CUDA device that computes it natively, else float16; float16 on MPS; on the CPU float32
    for ``as-stored`` weights and bfloat16 for int8/int4, whose CPU kernels are fast with bfloat16 activations (a
    2048x2048 matrix-vector product: 0.12 ms against 1.9-3 ms with float32, measured on this 2-core machine).

    Raises:
        DeviceError: a bad spec, or bfloat16 on a CUDA device without native bfloat16.
    """
    if spec not in DTYPE_SPECS:
        raise DeviceError(f"dtype {spec!r} is not one of {', '.join(DTYPE_SPECS)}")
    kind = device_kind(device)
    if spec == "auto":
        if kind == "cuda":
            return "bfloat16" if facts.bf16_supported else "float16"
        if kind == "mps":
            return "float16"
        return "float32" if weights == "as-stored" else "bfloat16"
    if spec == "bfloat16" and kind == "cuda" and not facts.bf16_supported:
        raise DeviceError(f"dtype 'bfloat16' cannot run on {device}: it has no native bfloat16 "
                          f"(torch.cuda.is_bf16_supported() is False: compute capability below 8.0); "
                          f"use --dtype float16 or auto")
    return spec


def format_conflict(device: str, dtype: str, weights: tuple[str, ...]) -> str | None:
    """Why a node on ``device`` at ``dtype`` cannot run one of ``weights``, as far as its description tells (no
    probe: a CUDA device is taken to support bfloat16), or None."""
    facts = Facts(cuda_available=True, cuda_count=1, bf16_supported=True, mps_available=True)
    return next((why for w in weights if (why := _why_not(w, device, dtype, facts))), None)


def _why_not(weights: str, device: str, dtype: str, facts: Facts) -> str | None:
    # torch's int4 kernels: _weight_int4pack_mm_for_cpu on the CPU, tinygemm's _weight_int4pack_mm on CUDA
    # (aten/src/ATen/native/cuda/int4mm.cu: built for compute capability 8.0+ only, and it checks "expect A to be
    # bfloat16 tensor"); none on MPS.
    kind = device_kind(device)
    if weights != "int4" or kind == "cpu":
        return None
    if kind == "mps":
        return "torch has no int4 kernel for MPS"
    if not facts.bf16_supported:
        return "torch's CUDA int4 kernel (tinygemm) needs compute capability 8.0 or more"
    if dtype != "bfloat16":
        return f"torch's CUDA int4 kernel (tinygemm) computes in bfloat16, not {dtype}"
    return None


def choose_weights(spec: str, device: str, dtype: str, facts: Facts) -> tuple[str, ...]:
    """The weight formats a node accepts: ``spec`` as `williw.precision.parse_weights` reads it (highest precision
    first); ``auto`` keeps those ``device`` can run at ``dtype``.

    Raises:
        DeviceError: a bad spec, or a format named explicitly that the device cannot run at ``dtype``.
    """
    try:
        requested = parse_weights(spec)
    except ValueError as exc:
        raise DeviceError(str(exc)) from None
    if spec == "auto":
        return tuple(w for w in requested if _why_not(w, device, dtype, facts) is None)
    for w in requested:
        why = _why_not(w, device, dtype, facts)
        if why is not None:
            raise DeviceError(f"weights '{w}' cannot run on {device} at {dtype}: {why}; use --weights int8, "
                              f"as-stored or auto")
    return requested


def decide(device: str, dtype: str, weights: str, facts: Facts) -> tuple[str, str, tuple[str, ...]]:
    """The device, compute dtype and accepted weight formats of a node asked for ``device``, ``dtype`` and
    ``weights`` (`choose_device`, `choose_dtype` for its highest-precision format, `choose_weights`).

    Raises:
        DeviceError: one line naming what cannot run here.
    """
    chosen = choose_device(device, facts)
    try:
        first = parse_weights(weights)[0]
    except ValueError as exc:
        raise DeviceError(str(exc)) from None
    compute = choose_dtype(dtype, chosen, first, facts)
    return chosen, compute, choose_weights(weights, chosen, compute, facts)


def _gpu_possible() -> bool:
    if not sys.platform.startswith("linux"):
        return True  # macOS has MPS; elsewhere ask torch
    return any(os.path.exists(p) for p in _GPU_FILES)


def probe(spec: str = "auto") -> Facts:
    """The facts `choose_device` needs for ``spec``, from torch (imported only when the answer depends on it).

    Raises:
        DeviceError: a bad spec.
        MissingDependency: a GPU asked for explicitly and torch is not installed.
    """
    check_device_spec(spec)
    if spec == "cpu" or spec == "auto" and not _gpu_possible():
        return Facts()
    if importlib.util.find_spec("torch") is None:
        if spec == "auto":
            return Facts()
        require_torch(f"device '{spec}'")
    import torch

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    index = int(spec.partition(":")[2] or 0)
    bf16 = False
    if cuda and index < count:
        with torch.cuda.device(index):
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return Facts(cuda, count, bf16, torch.backends.mps.is_available())


def resolve_device(spec: str) -> str:
    """``cpu``, ``cuda:N`` or ``mps`` for ``auto|cpu|cuda|cuda:N|mps`` on this machine (`choose_device`).

    Raises:
        DeviceError: a bad spec, or a device this machine does not have.
    """
    return choose_device(spec, probe(spec))


def resolve_dtype(spec: str, device: str, weights: str) -> str:
    """The compute dtype for ``auto|float32|bfloat16|float16`` on ``device`` (resolved) with weights in format
    ``weights`` (`choose_dtype`).

    Raises:
        DeviceError: a bad spec, or a dtype the device cannot compute.
    """
    facts = probe(device) if device_kind(device) == "cuda" else Facts()
    return choose_dtype(spec, device, weights, facts)


def describe_device(device: str) -> dict[str, Any]:
    """``{"kind", "name", "memory_bytes"}`` of a resolved device: the CUDA device's name and VRAM, or the CPU's
    model name and the machine's RAM (for MPS too: its memory is the unified RAM)."""
    kind = device_kind(device)
    if kind == "cuda":
        import torch

        index = int(device.partition(":")[2] or 0)
        return {"kind": kind, "name": torch.cuda.get_device_name(index),
                "memory_bytes": int(torch.cuda.get_device_properties(index).total_memory)}
    return {"kind": kind, "name": _cpu_name(), "memory_bytes": _ram_bytes()}


def resolve_node(device: str = "auto", dtype: str = "auto", weights: str = "as-stored") -> NodeDevice:
    """What ``williw node --device --dtype --weights`` runs on and in, on this machine (`decide`, `describe_device`).

    Raises:
        DeviceError: one line naming what cannot run here (the agent exits 2 with it before registering).
        MissingDependency: a GPU asked for and torch not installed.
    """
    chosen, compute, formats = decide(device, dtype, weights, probe(device))
    info = describe_device(chosen)
    return NodeDevice(chosen, info["kind"], info["name"], info["memory_bytes"], compute, formats)


def _cpu_name() -> str:
    try:  # x86 Linux says "model name"; some ARM boards only "Hardware" or "Model"
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                return " ".join(value.split())[:200]
    except OSError:
        pass
    if sys.platform == "darwin":  # "Apple M2 Pro"
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5, check=False).stdout.strip()
        except OSError:
            out = ""
        if out:
            return out[:200]
    return platform.processor() or platform.machine() or "unknown CPU"


def _ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
