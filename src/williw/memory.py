"""What a block needs at run time beyond its weights: the KV cache (or recurrent state) and its activations.

All figures come from ``config.json`` (no weights, no torch). Element size ``e`` is the config's ``torch_dtype``
(``dtype`` in newer files): 2 bytes for float16/bfloat16 (and for quantized checkpoints, which run in 16-bit),
4 for float32.

KV cache per token of one attention layer (the model's own ``DynamicCache`` stores one key and one value vector
per KV head and token):
  * softmax attention, grouped-query or not: ``2 · kv_heads · head_dim · e`` (``kv_heads`` =
    ``num_key_value_heads``, else ``num_attention_heads``; ``head_dim`` from the config, else
    ``hidden_size / num_attention_heads``; Ainslie et al. 2023, "GQA", section 2);
  * sliding-window layers keep at most ``W`` tokens (``sliding_window``; every layer of a Mistral-style model
    without ``layer_types``, the ``sliding_attention`` entries of ``layer_types`` for Gemma 2/3 and others);
  * latent attention (DeepSeek-V2 ``kv_lora_rank``): ``(kv_lora_rank + qk_rope_head_dim) · e`` — the compressed
    latent and the shared rotary key, as the DeepSeek-V2 paper (section 2.1.2, "(d_c + d_h^R)·l elements") and
    transformers' ``DeepseekV2Attention`` cache them;
  * state-space (Mamba) blocks: no per-token cache but a per-sequence state of
    ``d_inner · (d_conv + d_state) · e`` (the convolution window and the SSM state of ``MambaCache``).

Activations per token: the largest transient of a block over ``T = B·S`` tokens, counted from the tensors that
transformers' own blocks keep alive at their widest point (``LlamaDecoderLayer``/``LlamaAttention``/``LlamaMLP``
and their relatives): the stage's input, the residual and its normed copy (``3·hidden``), the rotary tables
(``2·head_dim``), plus the wider of the attention — ``q``, its rotated copy, the attention output and its
contiguous reshape (``4·q_dim``), ``k``, ``v`` and the rotated ``k`` (``3·kv_dim``), and for grouped-query
attention the keys and values repeated to every head (``2·q_dim``) — and the MLP: ``gate``, ``up`` and their
product (``3·ffn``; ``ffn`` is ``moe_intermediate_size · num_experts_per_tok`` for mixture-of-experts blocks) —
times ``e``. This is the inference subset of the tensors Korthikanti et al. 2022 count ("Reducing Activation
Recomputation in Large Transformer Models", section 4.1, ``sbh(34 + 5as/h)`` for training); measured against
`williw verify --batch-size --context-length` (README). A Mamba block adds the unfused scan's ``exp(Δ·A)`` and
``Δ·B·x`` tensors, ``2 · d_inner · d_state`` float32 values per token (transformers'
``MambaMixer.slow_forward``), to ``2·hidden + 4·d_inner`` elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_DTYPE_BYTES = {"float32": 4, "float": 4, "float64": 8, "float16": 2, "half": 2, "bfloat16": 2}
_NO_KV = ("linear_attention", "mamba", "ssm", "conv", "short_conv")


@dataclass(frozen=True)
class BlockMemory:
    """Run-time memory of one block.

    ``kv_bytes_per_token``: cache bytes per token of one sequence; ``kv_window``: the most tokens the cache keeps
    (0 = the whole context); ``state_bytes``: per-sequence recurrent state; ``activation_bytes_per_token``: the
    block's largest transient per token of the forward pass.
    """

    kv_bytes_per_token: int = 0
    kv_window: int = 0
    state_bytes: int = 0
    activation_bytes_per_token: int = 0

    def kv_bytes(self, batch: int, context: int) -> int:
        """Cache and state bytes for ``batch`` sequences of ``context`` tokens."""
        tokens = min(context, self.kv_window) if self.kv_window else context
        return batch * (self.kv_bytes_per_token * tokens + self.state_bytes)


def _get(cfg: dict[str, Any], *keys: str) -> Any:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for key in keys:
        for source in (cfg, text):
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def compute_dtype(cfg: dict[str, Any]) -> str | None:
    """The config's ``torch_dtype``/``dtype`` (``bfloat16``, ``float32``, ...), or None when it names none."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for source in (cfg, text):
        for key in ("torch_dtype", "dtype"):
            value = source.get(key)
            if isinstance(value, str) and value.removeprefix("torch.") in _DTYPE_BYTES:
                return {"float": "float32", "half": "float16"}.get(value.removeprefix("torch."),
                                                                   value.removeprefix("torch."))
    return None


def element_bytes(cfg: dict[str, Any]) -> int:
    """Bytes of one activation or cache element: the config's ``torch_dtype``/``dtype``, else 2."""
    name = compute_dtype(cfg)
    return _DTYPE_BYTES[name] if name else 2


def _window(cfg: dict[str, Any], kind: str | None) -> int:
    window = _get(cfg, "sliding_window")
    if not window or window <= 0 or cfg.get("use_sliding_window") is False:
        return 0
    if kind is None:  # no layer_types: a Mistral-style config windows every layer
        return window
    return window if kind == "sliding_attention" else 0


def block_memory(cfg: dict[str, Any], kind: str | None, *, attention: bool, a_log: tuple[int, ...] | None,
                 hidden: int) -> BlockMemory:
    """The run-time memory of one decoder block.

    Args:
        cfg: the loaded ``config.json``.
        kind: the block's ``layer_types`` entry, or None when the config has none.
        attention: whether the block has (self-)attention weights.
        a_log: the shape of the block's ``A_log`` (a Mamba block), else None.
        hidden: the model width.

    Returns:
        The block's `BlockMemory` (all zero fields when the config says too little).
    """
    e = element_bytes(cfg)
    # BART, Marian, Whisper: the decoder's own keys (only decoder blocks keep a cache)
    heads = _get(cfg, "num_attention_heads", "n_head", "num_heads", "decoder_attention_heads") or 0
    kv_heads = _get(cfg, "num_key_value_heads", "n_head_kv") or heads
    head_dim = _get(cfg, "head_dim") or (hidden // heads if heads else 0)
    ffn = _get(cfg, "intermediate_size", "n_inner", "ffn_dim", "d_ff", "decoder_ffn_dim") or 4 * hidden
    if _get(cfg, "moe_intermediate_size") and _get(cfg, "num_experts_per_tok"):
        ffn = max(ffn, _get(cfg, "moe_intermediate_size") * _get(cfg, "num_experts_per_tok"))
    kv = window = state = 0
    widest = 0
    if a_log is not None:
        d_inner = a_log[0] if len(a_log) == 2 else (_get(cfg, "intermediate_size") or 2 * hidden)
        d_state = a_log[1] if len(a_log) == 2 else (_get(cfg, "state_size", "ssm_state_size") or 0)
        d_conv = _get(cfg, "conv_kernel", "d_conv", "mamba_d_conv") or 4
        state = d_inner * (d_conv + d_state) * e
        return BlockMemory(0, 0, state, e * (2 * hidden + 4 * d_inner) + 4 * 2 * d_inner * d_state)
    if attention and kind not in _NO_KV:
        lora = _get(cfg, "kv_lora_rank")
        if lora:
            kv = (lora + (_get(cfg, "qk_rope_head_dim") or 0)) * e
            q_dim = heads * ((_get(cfg, "qk_nope_head_dim") or 0) + (_get(cfg, "qk_rope_head_dim") or 0))
            # q, its rotated copy, the keys expanded from the latent (q_dim) and the values, output, reshape
            widest = 3 * q_dim + 3 * heads * (_get(cfg, "v_head_dim") or head_dim)
        else:
            kv = 2 * kv_heads * head_dim * e
            q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
            widest = 4 * q_dim + 3 * kv_dim + (2 * q_dim if kv_heads < heads else 0)
        window = _window(cfg, kind)
    act = e * (3 * hidden + 2 * head_dim + max(widest, 3 * ffn))
    return BlockMemory(kv, window, state, act)
