"""KV cache, state and activation bytes per block from config.json, against hand computations."""

from __future__ import annotations

from williw.memory import BlockMemory, block_memory, element_bytes
from williw.metadata import generate_metadata


def test_llama_grouped_query_attention() -> None:
    # Llama 3 8B: 8 KV heads of 128 in bf16: 2 (K and V) · 8 · 128 · 2 bytes = 4,096 bytes per token.
    cfg = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
           "torch_dtype": "bfloat16"}
    m = block_memory(cfg, None, attention=True, a_log=None, hidden=4096)
    assert (m.kv_bytes_per_token, m.kv_window, m.state_bytes) == (4096, 0, 0)
    assert m.kv_bytes(2, 8192) == 2 * 8192 * 4096
    # Activations: 3 · hidden + 2 · head_dim + max(4 · 4096 + 3 · 1024 + 2 · 4096 (attention), 3 · 14,336 (MLP))
    # elements of 2 bytes.
    assert m.activation_bytes_per_token == 2 * (3 * 4096 + 2 * 128 + 3 * 14336)


def test_mistral_sliding_window_caps_every_layer() -> None:
    cfg = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096,
           "intermediate_size": 14336, "torch_dtype": "bfloat16"}
    m = block_memory(cfg, None, attention=True, a_log=None, hidden=4096)
    assert (m.kv_bytes_per_token, m.kv_window) == (4096, 4096)
    assert m.kv_bytes(1, 32768) == 4096 * 4096 and m.kv_bytes(1, 1000) == 1000 * 4096
    # Qwen2 writes a window but turns it off.
    assert block_memory({**cfg, "use_sliding_window": False}, None, attention=True, a_log=None,
                        hidden=4096).kv_window == 0


def test_gemma2_alternates_windowed_and_full_layers() -> None:
    # Gemma 2 9B: 8 KV heads of 256 (head_dim given), bf16: 8,192 bytes per token; window 4,096 on sliding layers.
    cfg = {"hidden_size": 3584, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
           "sliding_window": 4096, "intermediate_size": 14336, "torch_dtype": "bfloat16",
           "layer_types": ["sliding_attention", "full_attention"] * 21}
    sliding = block_memory(cfg, "sliding_attention", attention=True, a_log=None, hidden=3584)
    full = block_memory(cfg, "full_attention", attention=True, a_log=None, hidden=3584)
    assert (sliding.kv_bytes_per_token, sliding.kv_window) == (8192, 4096)
    assert (full.kv_bytes_per_token, full.kv_window) == (8192, 0)
    assert sliding.kv_bytes(1, 8192) + full.kv_bytes(1, 8192) == 8192 * (4096 + 8192)


def test_deepseek_v2_latent_attention_caches_the_latent() -> None:
    # DeepSeek-V2-Lite: kv_lora_rank 512 + qk_rope_head_dim 64 elements of bf16 per token: 1,152 bytes, whatever
    # the 16 heads.
    cfg = {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512,
           "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "num_experts_per_tok": 6, "n_routed_experts": 64,
           "torch_dtype": "bfloat16"}
    m = block_memory(cfg, None, attention=True, a_log=None, hidden=2048)
    assert (m.kv_bytes_per_token, m.kv_window) == (1152, 0)


def test_mamba_keeps_a_state_per_sequence() -> None:
    # Mamba 130M: d_inner 1,536, d_state 16 (A_log [1536, 16]), conv kernel 4, float32:
    # 1,536 · (4 + 16) · 4 = 122,880 bytes per sequence, none per token.
    cfg = {"hidden_size": 768, "intermediate_size": 1536, "state_size": 16, "conv_kernel": 4,
           "torch_dtype": "float32"}
    m = block_memory(cfg, None, attention=False, a_log=(1536, 16), hidden=768)
    assert (m.kv_bytes_per_token, m.state_bytes) == (0, 122880)
    assert m.kv_bytes(3, 100_000) == 3 * 122880
    assert m.activation_bytes_per_token == 4 * (2 * 768 + 4 * 1536) + 4 * 2 * 1536 * 16


def test_linear_attention_layers_and_defaults() -> None:
    cfg = {"hidden_size": 64, "num_attention_heads": 4}
    assert block_memory(cfg, "linear_attention", attention=True, a_log=None, hidden=64).kv_bytes_per_token == 0
    assert element_bytes({}) == 2 and element_bytes({"dtype": "float32"}) == 4
    assert element_bytes({"text_config": {"torch_dtype": "float16"}}) == 2
    assert BlockMemory().kv_bytes(4, 100) == 0


def test_metadata_records_run_time_memory_per_block(tiny_llama) -> None:
    # The tiny Llama: 2 KV heads of 16 in float32: 2 · 2 · 16 · 4 = 256 bytes per token per block.
    meta = generate_metadata(tiny_llama)
    assert meta.element_bytes == 4
    assert {(b.kv_bytes_per_token, b.kv_window, b.state_bytes) for b in meta.blocks} == {(256, 0, 0)}
    # 4 · (3 · 64 + 2 · 16 + max(4 · 64 + 3 · 32 + 2 · 64, 3 · 128)): here the attention is the wider
    assert {b.activation_bytes_per_token for b in meta.blocks} == {4 * (3 * 64 + 2 * 16 + 4 * 64 + 3 * 32 + 2 * 64)}
