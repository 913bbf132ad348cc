"""Which models the pipeline can generate with, and what transformers' own ``generate`` does for a model that the
pipeline's decode loop (`williw.pipeline.generate_tokens`) must do too.

Most decoder families generate through the shared ``GenerationMixin.prepare_inputs_for_generation``: the new
tokens, their positions, the KV cache. Some override it (transformers 5.x); each override is either reproduced
here, shown to make no difference to a stage that receives only token ids and positions, or refused in one line,
so that a family transformers generates with is never silently different:

- ``Phi3ForCausalLM``, ``PhimoeForCausalLM``: once the sequence reaches ``original_max_position_embeddings + 1``
  tokens, the cache is dropped and the whole sequence runs again (the long-rope factors replace the short ones from
  there). Reproduced: `DecodeRules.recompute_at`.
- ``BambaForCausalLM``, ``FalconH1ForCausalLM``, ``NemotronHForCausalLM``, ``ZambaForCausalLM``,
  ``Zamba2ForCausalLM``: set ``logits_to_keep`` from the config; the last stage keeps the last position's logits,
  the only ones a step uses.
- ``MambaForCausalLM``, ``Mamba2ForCausalLM``, ``FalconMambaForCausalLM``: drop the attention mask after the
  prefill; the stages never pass one.
- ``CTRLLMHeadModel``: drops ``token_type_ids``; the stages never pass them.

Any other override is refused, as are models that keep a cache of their own (``_supports_default_dynamic_cache``
false: MiniMax, XLNet, Reformer, RWKV) and models whose forward takes no KV cache at all (OpenAI GPT). Checked by
``tests/test_family_matrix.py``: 16 greedy tokens through two node processes equal ``model.generate``.

torch and transformers are imported inside the functions (they are an extra).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from williw.errors import GenerateError
from williw.hfmodel import model_class

__all__ = ["DecodeRules", "decode_rules"]

_RECOMPUTE = ("Phi3ForCausalLM", "PhimoeForCausalLM")
_SAME_FOR_STAGES = ("BambaForCausalLM", "FalconH1ForCausalLM", "NemotronHForCausalLM", "ZambaForCausalLM",
                    "Zamba2ForCausalLM", "MambaForCausalLM", "Mamba2ForCausalLM", "FalconMambaForCausalLM",
                    "CTRLLMHeadModel")


@dataclass(frozen=True)
class DecodeRules:
    """How the decode loop runs a model.

    Attributes:
        architecture: the transformers class (``config.architectures[0]``).
        recompute_at: when the KV cache holds exactly this many tokens, the next step drops it and runs the whole
            sequence from position 0 again (Phi-3's long-rope switch); None: never.
    """

    architecture: str
    recompute_at: int | None = None


def decode_rules(config: Any) -> DecodeRules:
    """The decode rules of the model of ``config`` (a transformers config).

    Raises:
        GenerateError: one line naming the architecture, when the pipeline cannot generate with it as
            ``model.generate`` does (quantized, not one chain of blocks, its own cache, no KV cache, an override of
            ``prepare_inputs_for_generation`` not reproduced here).
    """
    name, cls = model_class(config, for_generation=True)
    if not cls._supports_default_dynamic_cache():
        raise GenerateError(f"architecture '{name}' keeps a cache of its own (transformers does not give it a "
                            f"DynamicCache), which the stages cannot split by layer")
    params = inspect.signature(cls.forward).parameters
    if "cache" not in params and "past_key_values" not in params:
        raise GenerateError(f"architecture '{name}' keeps no KV cache (its forward takes none): transformers "
                            f"recomputes the whole sequence for every token, which the stages do not do")
    owner = next(k for k in cls.__mro__ if "prepare_inputs_for_generation" in vars(k))
    if owner.__module__.startswith("transformers.generation"):
        return DecodeRules(name)
    if owner.__name__ in _RECOMPUTE:
        at = getattr(config.get_text_config(), "original_max_position_embeddings", None)
        return DecodeRules(name, at if isinstance(at, int) else None)
    if owner.__name__ in _SAME_FOR_STAGES:
        return DecodeRules(name)
    raise GenerateError(f"architecture '{name}' prepares its generation inputs its own way "
                        f"({owner.__name__}.prepare_inputs_for_generation), which williw's decode loop does not "
                        f"reproduce")
