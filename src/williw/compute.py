"""What a tensor is, and what it costs: parameters and forward FLOPs from its role, not from its dtype and shape.

Compute model: FLOPs of one forward pass over ``T = B·S`` tokens.
  * matrix weight (≥ 2 dims, not an embedding): ``2·T·params`` — one multiply-add per weight per token
    (Kaplan et al. 2020, "Scaling Laws", table 1: C_forward ≈ 2N); embedding tables 0 (a gather);
  * bias: ``T·params``; norm weight: ``4·T·params`` (mean/variance, normalise, scale);
  * quantized linear layers (GPTQ, AWQ, bitsandbytes 4/8-bit, FP8 with scales): priced and counted at their
    logical shape — GPTQ ``qweight`` is int32 ``[in·bits/32, out]``, AWQ ``[in, out·bits/32]`` (AutoGPTQ and
    AutoAWQ packing), a bitsandbytes 4-bit weight is ``uint8`` with two values a byte; scales, zero points,
    ``g_idx`` and quantization state are neither parameters nor compute (bytes as stored);
  * derivable buffers stored by older exports (GPT-2's causal ``attn.bias`` mask, rotary ``inv_freq`` and caches,
    ``position_ids``): neither parameters nor compute;
  * mixture-of-experts weights (under ``.experts.``, not ``shared_experts``, or a 3-D stack with one slice per
    expert): compute at the active fraction
    ``num_experts_per_tok / num_experts`` (rounded down to whole FLOPs), memory and parameters in full;
  * state-space (Mamba) scan: ``9·T·d_inner·d_state`` per block — the selective scan's discretisation
    (``exp(Δ·A)``, ``Δ·B·x``), state update and output ``C·h`` cost 9 FLOPs per (token, channel, state), as
    counted by ``flops_selective_scan_fn`` in VMamba (MzeroMiko/VMamba, ``classification/models/vmamba.py``,
    ``flops = 9 * B * L * D * N``, from state-spaces/mamba issue #110); its ``+ B·D·L`` skip term is the ``D``
    vector's own ``T·d_inner`` here. ``A_log`` is part of the scan and costs nothing alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from williw.units import FLOAT_DTYPES

NORM_FLOPS_PER_ELEMENT = 4
SSM_FLOPS_PER_STATE = 9
# Tensors that are quantization state, not weights: zero points, scales, group indices, bitsandbytes state.
_QUANT_STATE = ("qzeros", "scales", "g_idx", "weight_scale", "weight_scale_inv", "input_scale", "SCB",
                "weight_format", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "zeros", "scale")
_BUFFERS = ("inv_freq", "position_ids", "cos_cached", "sin_cached", "masked_bias", "_float_tensor")
# Module names of cross-attention (T5, BART/Whisper, GPT-2 with add_cross_attention, mllama): a second core.
CROSS_ATTENTION = ("encdecattention", "encoder_attn", "crossattention", "cross_attn")
# config layer_types with no softmax attention core (linear attention, state-space and convolution layers).
_NO_CORE = ("linear_attention", "mamba", "ssm", "conv", "short_conv")


@dataclass(frozen=True)
class TensorCost:
    """``params`` are logical weights (unpacked); ``flops`` for ``T`` tokens; ``note`` says why a cost is special."""

    params: int
    flops: int
    note: str | None  # None, "quantized", "quant_state", "buffer", "experts"


def _get(cfg: dict[str, Any], *keys: str) -> Any:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for key in keys:
        for source in (cfg, text):
            if source.get(key) is not None:
                return source[key]
    return None


class CostModel:
    """Prices the tensors of one checkpoint; built once from its config and tensor names.

    Args:
        cfg: the loaded ``config.json`` (``{}`` when there is none).
        names: every tensor name (to recognise a quantized weight by its siblings).
        tokens: ``B·S``.
    """

    def __init__(self, cfg: dict[str, Any], names: set[str], tokens: int) -> None:
        self.tokens = tokens
        self.names = names
        quant = _get(cfg, "quantization_config")
        self.quant: dict[str, Any] = quant if isinstance(quant, dict) else {}
        self.method = str(self.quant.get("quant_method", "")).lower()
        bits = self.quant.get("bits") or self.quant.get("w_bit") or 4
        self.pack = 32 // bits if isinstance(bits, int) and bits in (2, 4, 8) else 8
        self.quantized = bool(self.quant) or any(n.endswith(".qweight") for n in names)
        experts = _get(cfg, "num_local_experts", "num_experts", "n_routed_experts")
        active = _get(cfg, "num_experts_per_tok", "moe_topk", "num_selected_experts")
        self.experts = (active, experts) if isinstance(experts, int) and isinstance(active, int) and experts > 0 \
            else None

    def cost(self, name: str, shape: tuple[int, ...], dtype: str, kind: str) -> TensorCost:
        """Parameters and forward FLOPs of one tensor of layer type ``kind``."""
        n = math.prod(shape)
        last = name.rsplit(".", 1)[-1]
        if is_buffer(name, shape):
            return TensorCost(0, 0, "buffer")
        if self.quantized:
            if last == "qweight" and len(shape) == 2:
                logical = n * self.pack
                return TensorCost(logical, self._experts(name, 2 * self.tokens * logical), "quantized")
            if last in _QUANT_STATE or ".quant_state." in name:
                return TensorCost(0, 0, "quant_state")
            if last == "weight" and dtype == "U8" and f"{name}.absmax" in self.names:
                logical = 2 * n  # bitsandbytes 4-bit: two 4-bit values per stored byte
                return TensorCost(logical, self._experts(name, 2 * self.tokens * logical), "quantized")
            if last == "weight" and dtype == "I8" and name[:-len("weight")] + "SCB" in self.names:
                return TensorCost(n, self._experts(name, 2 * self.tokens * n), "quantized")
        if dtype not in FLOAT_DTYPES or kind == "embedding" or last == "A_log":
            return TensorCost(n, 0, None)
        if len(shape) >= 2:
            flops = 2 * self.tokens * n
        elif kind == "norm" and not name.endswith("bias"):
            flops = NORM_FLOPS_PER_ELEMENT * self.tokens * n
        else:
            flops = self.tokens * n
        scaled = self._experts(name, flops, shape)
        return TensorCost(n, scaled, "experts" if scaled != flops else None)

    def _experts(self, name: str, flops: int, shape: tuple[int, ...] = ()) -> int:
        # Stacked experts are one 3-D tensor [experts, out, in] under any name: GraniteMoE's
        # block_sparse_moe.input_linear, JetMoE's mlp.input_linear (priced in full, 4x for 2 of 8, before).
        stacked = len(shape) == 3 and self.experts is not None and shape[0] == self.experts[1]
        if self.experts is None or ("experts" not in name.split(".") and not stacked):
            return flops
        active, total = self.experts
        return flops * active // total


def is_buffer(name: str, shape: tuple[int, ...]) -> bool:
    """A derivable buffer some exports store: a causal mask (GPT-2's 4-D ``attn.bias``), rotary tables, ids."""
    parts = name.split(".")
    if parts[-1] in _BUFFERS:
        return True
    return len(parts) >= 2 and parts[-2] == "attn" and parts[-1] == "bias" and len(shape) == 4


def ssm_core_flops(a_log_shape: tuple[int, ...], cfg: dict[str, Any], tokens: int) -> int:
    """The selective scan of one Mamba block: ``9·T·d_inner·d_state`` (see the module docstring).

    ``A_log`` is ``[d_inner, d_state]`` in Mamba 1; Mamba 2 stores one value per head, so ``d_inner`` and
    ``d_state`` come from the config (``num_heads·head_dim``, ``state_size``).
    """
    if len(a_log_shape) == 2:
        d_inner, d_state = a_log_shape
    else:
        heads, head_dim = _get(cfg, "num_heads", "mamba_n_heads"), _get(cfg, "head_dim", "mamba_d_head")
        d_state = _get(cfg, "state_size", "ssm_state_size", "mamba_d_state") or 0
        d_inner = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else 0
    return SSM_FLOPS_PER_STATE * tokens * d_inner * d_state


def keys_attended(layer_types: tuple[str, ...] | None, index: int | None, cfg: dict[str, Any], seq: int) -> int:
    """Keys each query of block ``index`` attends to, for the ``4·B·S·keys·hidden`` core: ``S``; a sliding
    window's ``W`` when shorter (each query sees at most ``W`` keys); 0 for a layer type without softmax
    attention (config ``layer_types``)."""
    if layer_types is None or index is None:
        return seq
    kind = layer_types[index]
    if kind in _NO_CORE:
        return 0
    window = _get(cfg, "sliding_window")
    return min(seq, window) if kind == "sliding_attention" and isinstance(window, int) and window > 0 else seq


def stack_hidden(cfg: dict[str, Any], part: str) -> int | None:
    """The width of a stack's attention when it is not the model's: a vision tower's own (``embed_dim``)."""
    vision = cfg.get("vision_config")
    if part == "vision" and isinstance(vision, dict):
        value = vision.get("embed_dim") or vision.get("hidden_size")
        return value if isinstance(value, int) else None
    return None
