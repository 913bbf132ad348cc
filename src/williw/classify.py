"""Which transformer block a tensor belongs to, and what kind of layer it is, from its name alone.

Block detection is generic: the block stack is the module path whose numeric child index takes the most distinct
values, looking only at the leftmost number in each name (so ``model.layers.3.mlp.experts.17`` counts for
``model.layers``, not for the experts). That covers ``model.layers.N`` (Llama, Mistral, Qwen2), ``transformer.h.N``
(GPT-2), ``encoder.layer.N`` (BERT), ``gpt_neox.layers.N``, ``model.decoder.layers.N`` (OPT),
``transformer.blocks.N`` (MPT) and prefix-less ``h.N`` without a table per model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

LAYER_TYPES = ("embedding", "attention", "mlp", "norm", "lm_head", "ssm", "other")

_LM_HEAD = ("lm_head", "embed_out", "output_layer", "cls.predictions.decoder")
_NORM = ("norm", "ln_", "ln1", "ln2", "ln3", "layernorm")
_EMBEDDING = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")
_ATTENTION = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv", "query", "key", "value",
              "c_attn", "c_proj_attn", "out_proj", "dense_qkv")
_MLP = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "fc1", "fc2", "c_fc", "gate_proj",
        "up_proj", "down_proj", "experts", "router", "gate", "w1", "w2", "w3", "dense_h_to_4h", "dense_4h_to_h",
        "densereludense", "densegatedactdense")


def leftmost_index(name: str) -> tuple[str, int] | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if i > 0 and part.isdigit():
            return ".".join(parts[:i]), int(part)
    return None


def find_block_prefix(names: Iterable[str]) -> str | None:
    """The module path of the transformer block stack, or None for a model without one."""
    indices: dict[str, set[int]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    for name in names:
        found = leftmost_index(name)
        if found:
            indices[found[0]].add(found[1])
            counts[found[0]] += 1
    if not indices:
        return None
    return max(indices, key=lambda p: (len(indices[p]), counts[p], -len(p)))


def block_of(name: str, prefix: str | None) -> int | None:
    """The block index of ``name`` under the stack ``prefix``, or None."""
    if prefix is None or not name.startswith(prefix + "."):
        return None
    rest = name[len(prefix) + 1:]
    head, _, tail = rest.partition(".")
    return int(head) if head.isdigit() and tail else None


def layer_type(name: str) -> str:
    """One of LAYER_TYPES, from the module path. Checked in this order: lm_head, norm, embedding, attention, mlp."""
    lowered = name.lower()
    modules = lowered.split(".")[:-1] or [lowered]
    path = ".".join(modules)
    if any(path.startswith(k) or f".{k}" in path for k in _LM_HEAD):
        return "lm_head"
    if any(k in m for m in modules for k in _NORM):
        return "norm"
    if any(k in m for m in modules for k in _EMBEDDING) or "shared" in modules[:2]:  # T5's, BART's (model.shared)
        return "embedding"
    if any(k in m for m in modules for k in _ATTENTION):
        return "attention"
    if any(m == k or m.startswith(k) for m in modules for k in _MLP) or any(
            k in m for m in modules for k in ("mlp", "ffn", "feed_forward", "intermediate")):
        return "mlp"
    # BERT's block output (encoder.layer.N.output.dense) is the second MLP matmul.
    if len(modules) >= 2 and modules[-2] == "output" and modules[-1] in ("dense", "layernorm"):
        return "mlp"
    return "other"


def is_embedding_side(name: str) -> bool:
    """Outside the blocks, tensors of the embedding module run before the first block; the rest after the last."""
    modules = name.lower().split(".")[:-1]
    return any(k in m for m in modules for k in _EMBEDDING) or "shared" in modules[:2]


# Embedding tables that are not the token table: positions (GPT-2's and GPT-BigCode's ``wpe``, OPT's and BART's
# ``embed_positions``, BERT's ``position_embeddings``) and token types or segments (BERT's ``token_type_embeddings``).
_NOT_TOKEN_TABLES = ("wpe", "position", "pos_emb", "pos_embed", "token_type", "segment")
# The module that transformers' ``get_input_embeddings()`` returns, as the families name it: Llama's
# ``embed_tokens``, GPT-2's ``wte``, BLOOM's and Falcon's ``word_embeddings``, GPT-NeoX's ``embed_in``, T5's and
# BART's ``shared``, Mamba's ``embeddings``.
_TOKEN_TABLES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "shared", "tok_embeddings", "token_embedding",
                 "embeddings")


def table_kind(name: str) -> str:
    """What an embedding table holds, from its module path: ``position`` (positions or token types: indexed by
    something other than the token ids), ``token`` (a module named as families name their input embedding), or
    ``unknown``."""
    modules = name.lower().split(".")[:-1]
    if any(k in m for m in modules for k in _NOT_TOKEN_TABLES):
        return "position"
    return "token" if modules and modules[-1] in _TOKEN_TABLES else "unknown"



# Families whose blocks store GPT-2's ``Conv1D`` ([in, out], not an ``nn.Linear``), and those whose block linears
# are subclasses of it (Falcon's ``FalconLinear``): a weight-only quantizer that converts exactly ``nn.Linear``
# modules (`williw.quantize`) leaves both at the compute dtype.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
SUBCLASSED_LINEAR_MODEL_TYPES = ("falcon",)
_FLOAT_STORED = ("F16", "BF16", "F32", "F64")
_NOT_LINEAR = ("relative_attention_bias",)  # T5's bucketed position bias: an nn.Embedding inside block 0
_ROUTERS = ("gate", "router")


@dataclass(frozen=True)
class TensorFacts:
    """What `quantizable_names` reads of a tensor (a `williw.metadata.LayerMeta` has all of it)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layer_type: str
    placement: str
    role: str | None
    note: str | None


def quantizable_names(tensors: Iterable[TensorFacts], model_type: str) -> set[str]:
    """The tensors a weight-only quantizer converts: the 2-D ``weight`` of each ``nn.Linear`` inside a block
    (attention and MLP projections, ``[out, in]``, stored in a float dtype).

    Not: embeddings, norms, biases, the head, modules between stacks; MoE experts (transformers 5 loads them as
    3-D parameters, not ``nn.Linear``) and their routers (``gate``/``router`` beside ``experts``: a plain
    parameter in ``MixtralTopKRouter`` and its relatives, an ``nn.Linear`` subclass in Llama 4 and PhiMoE);
    GPT-2-style ``Conv1D`` and subclassed linears (`CONV1D_MODEL_TYPES`, `SUBCLASSED_LINEAR_MODEL_TYPES`); tensors
    already quantized or derived (``note``). Checked against the modules transformers builds for the 28 tiny families
    (``tests/test_planner_precision.py``).
    """
    if model_type in CONV1D_MODEL_TYPES or model_type in SUBCLASSED_LINEAR_MODEL_TYPES:
        return set()
    tensors = list(tensors)
    with_experts = {x.name.split(".experts.")[0] for x in tensors if ".experts." in x.name}
    out = set()
    for x in tensors:
        if x.placement != "block" or x.role == "between" or len(x.shape) != 2 or x.dtype not in _FLOAT_STORED:
            continue
        if not x.name.endswith(".weight") or x.note is not None or x.layer_type in ("embedding", "norm", "lm_head"):
            continue
        parts = x.name.split(".")
        if "experts" in parts or any(k in p for p in parts for k in _NOT_LINEAR):
            continue
        if len(parts) >= 3 and parts[-2] in _ROUTERS and ".".join(parts[:-2]) in with_experts:
            continue
        out.add(x.name)
    return out
