"""Small real models, built with transformers and saved the way the Hub serves them.

Used by the tests, the benchmarks and the demo; torch and transformers are imported inside each builder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def _save(model: Any, path: Path, shard_bytes: int | None) -> Path:
    from williw.progress import quiet_transformers

    kwargs = {"max_shard_size": shard_bytes} if shard_bytes else {}
    with quiet_transformers():  # save_pretrained draws a "Writing model shards" bar (transformers 5)
        model.save_pretrained(path, **kwargs)
    return path


def build_causal_lm(path: Path, family: str = "llama", *, layers: int = 4, dtype: str = "float32",
                    tie: bool = False, shard_bytes: int | None = None, seed: int = 0, **overrides: Any) -> Path:
    """A tiny decoder-only LM of the Llama family (llama, mistral, qwen2), or GPT-2."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=128, n_positions=256,
                                      tie_word_embeddings=True, **overrides)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        config_cls, model_cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        }[family]
        cfg = config_cls(**{**TINY, "num_hidden_layers": layers, "tie_word_embeddings": tie, **overrides})
        model = model_cls(cfg)
    model = model.to(getattr(torch, dtype)).eval()
    return _save(model, path, shard_bytes)


# model_type -> config overrides that keep the tiny model valid and exercise the family's own features (sliding
# windows shorter than verify's 44-token prompt, alternating layer types, experts). The defaults come from TINY.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {"sliding_window": 8}, "qwen2": {}, "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16}, "gemma2": {"head_dim": 16, "sliding_window": 8},
    "gemma3_text": {"head_dim": 16, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"] * 2},
    "phi": {"pad_token_id": 0}, "phi3": {"pad_token_id": 0}, "gpt_neox": {},
    "falcon": {"num_kv_heads": 2, "new_decoder_architecture": True},
    "gpt2": {}, "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
    "bert": {}, "roberta": {"pad_token_id": 1},
    # vocab_size == n_positions: the position table has the token table's shape (issue 29).
    "gpt_bigcode": {"max_position_embeddings": 128},
    # opt-350m's layout: embeddings narrower than the blocks (project_in/project_out), post-norm, no final norm.
    "opt": {"word_embed_proj_dim": 32, "ffn_dim": 128, "do_layer_norm_before": False},
    "bloom": {}, "starcoder2": {}, "olmo2": {}, "stablelm": {}, "cohere": {}, "granite": {},
    "gptj": {"rotary_dim": 8}, "codegen": {"rotary_dim": 8}, "xglm": {"ffn_dim": 128}, "biogpt": {},
}
ENCODERS = ("bert", "roberta")


def build_family(path: Path, model_type: str, *, tie: bool | None = None, layers: int = 4, seed: int = 0,
                 **overrides: Any) -> Path:
    """A tiny model of any family in `FAMILIES`, built by transformers from a small config: a causal LM, or the
    bare encoder (``BertModel``, ``RobertaModel``) for encoder families. ``tie`` sets ``tie_word_embeddings``
    (None keeps the family's default)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = {**TINY, "num_hidden_layers": layers, **FAMILIES[model_type], **overrides}
    if tie is not None:
        kwargs["tie_word_embeddings"] = tie
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    auto = transformers.AutoModel if model_type in ENCODERS else transformers.AutoModelForCausalLM
    model = auto.from_config(config).to(torch.float32).eval()
    return _save(model, path, None)


def build_bert(path: Path, *, layers: int = 3, seed: int = 0) -> Path:
    """A tiny BERT encoder (BertModel: embeddings, encoder.layer.N, pooler)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=128, max_position_embeddings=128)
    return _save(transformers.BertModel(cfg).eval(), path, None)


def build_stored_tied_head(path: Path, *, same: bool = True, seed: int = 0) -> Path:
    """A tied tiny Llama whose checkpoint also stores ``lm_head.weight``: a copy of the token table, as a tied
    model's ``torch.save(state_dict())`` or a conversion of one to safetensors holds it, or (``same=False``) other
    values, as a model untied after training but still configured tied."""
    import torch
    from safetensors.torch import load_file, save_file

    build_causal_lm(path, "llama", tie=True, seed=seed)
    state = load_file(path / "model.safetensors")
    table = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = table.clone() if same else torch.flip(table, dims=(0,)).contiguous()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def build_bin_copy(src: Path, dst: Path, *, sharded: bool = False) -> Path:
    """The same weights as ``pytorch_model.bin`` (transformers 5 only writes safetensors, so torch.save them)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    state: dict[str, Any] = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(f))
    if not sharded:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, dst / file)
        weight_map.update({n: file for n in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def load_reference_state(path: Path) -> dict[str, Any]:
    """Every tensor of a saved model as torch loads it (safetensors or .bin)."""
    import torch
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    if not state:
        for f in sorted(path.glob("*.bin")):
            state.update(torch.load(f, weights_only=True))
    return state
