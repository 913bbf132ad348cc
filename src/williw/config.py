"""Read a model's ``config.json`` in every spelling transformers has used.

Older checkpoints say ``torch_dtype``, ``n_layer``, ``n_embd``, ``n_head``; newer ones ``dtype``,
``num_hidden_layers``, ``hidden_size``; multimodal ones nest the language model under ``text_config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from williw import jsonio
from williw.errors import CheckpointError

_ALIASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim", "model_dim"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
    "dtype": ("dtype", "torch_dtype"),
}


@dataclass(frozen=True)
class ModelConfig:
    """The fields of ``config.json`` that planning and verification need, normalised; ``raw`` keeps the rest."""

    model_type: str | None
    architecture: str | None
    hidden_size: int | None
    num_layers: int | None
    num_heads: int | None
    num_kv_heads: int | None
    vocab_size: int | None
    intermediate_size: int | None
    dtype: str | None
    tie_word_embeddings: bool
    raw: dict[str, Any]

    @property
    def has_lm_head(self) -> bool:
        """Whether the architecture ends in a language-model head (so a tied head costs a matmul)."""
        arch = self.architecture or ""
        return arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM"))


def _first(cfg: dict[str, Any], field: str) -> Any:
    for key in _ALIASES[field]:
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    """Normalise a loaded ``config.json`` dict."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    merged = {**text, **{k: v for k, v in cfg.items() if k != "text_config"}} if text else cfg

    def get(field: str) -> Any:
        value = _first(cfg, field)
        return _first(text, field) if value is None and text else value

    archs = cfg.get("architectures") or []
    dtype = get("dtype")
    return ModelConfig(
        model_type=cfg.get("model_type"),
        architecture=archs[0] if archs else None,
        hidden_size=get("hidden_size"),
        num_layers=get("num_layers"),
        num_heads=get("num_heads"),
        num_kv_heads=get("num_kv_heads"),
        vocab_size=get("vocab_size"),
        intermediate_size=get("intermediate_size"),
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        # PretrainedConfig's default is True, and save_pretrained omits values equal to the default.
        tie_word_embeddings=bool(merged.get("tie_word_embeddings", True)),
        raw=cfg,
    )


def read_config(model_dir: Path) -> ModelConfig | None:
    """Read ``model_dir/config.json``; None when there is none.

    Raises:
        CheckpointError: the file exists but is not a JSON object.
    """
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    return config_from_bytes(path.read_bytes(), str(path))


def config_from_bytes(data: bytes, label: str) -> ModelConfig:
    """Parse the bytes of a ``config.json`` (a local file's or a remote one's); ``label`` names it in errors.

    Raises:
        CheckpointError: not a JSON object.
    """
    try:
        cfg = jsonio.parse(data)
    except jsonio.JsonInputError as exc:
        raise CheckpointError(f"'{label}': config.json is {exc}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"'{label}': config.json must be a JSON object")
    return parse_config(cfg)
