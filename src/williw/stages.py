"""Pipeline stages of a transformers model, built from one shard each and run as separate nodes would run them.

A stage is the model skeleton from ``config.json`` on the meta device (no memory) with only the stage's modules
materialised: the embeddings on the first stage, its blocks, the final norm and head on the last. Between stages
only the hidden state travels; each stage derives everything else (position ids, rotary embeddings, the attention
mask) from its shape, as a node that never saw the tokens must. Each architecture's `Arch` mirrors that model's own
``forward`` in transformers 5, call for call, so that a float32 pipeline is bit-exact with the full model.

torch and transformers are imported inside the functions (they are an extra).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from williw.errors import VerifyError

if TYPE_CHECKING:
    import torch

# The attention kernel of both the reference and the stages. They must agree for bit-exactness; sdpa is what
# transformers 5 picks by default on CPU, so the reference is the model as users normally run it.
ATTN_IMPLEMENTATION = "sdpa"
# Math libraries may take another code path for data that is not 64-byte aligned (MKL documents that results can
# then differ in the last bits). safetensors aligns tensors to 8 bytes in a file, and from_pretrained keeps the
# memory-mapped file's tensors, so their alignment depends on the file: a tiny BERT's pooler gave 4.5e-08 apart with
# the same weight at two alignments. Both the reference and the stages therefore copy unaligned tensors.
ALIGNMENT = 64


@dataclass(frozen=True)
class Arch:
    """Where an architecture keeps its parts (module paths in the skeleton) and how to run them."""

    name: str
    first: tuple[str, ...]  # modules run before the first block
    blocks: str  # the ModuleList of blocks
    last: tuple[str, ...]  # modules run after the last block
    helpers: tuple[str, ...] = ()  # weightless modules every stage needs (rotary embeddings)
    outputs: tuple[str, ...] = ("logits",)


LLAMA = Arch("llama", ("model.embed_tokens",), "model.layers", ("model.norm", "lm_head"), ("model.rotary_emb",))
GPT2 = Arch("gpt2", ("transformer.wte", "transformer.wpe"), "transformer.h", ("transformer.ln_f", "lm_head"))
BERT = Arch("bert", ("embeddings",), "encoder.layer", ("pooler",), outputs=("last_hidden_state", "pooler_output"))

# architectures[0] of config.json -> adapter. Only classes whose forward the runners below mirror.
ARCHITECTURES: dict[str, Arch] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "GPT2LMHeadModel": GPT2,
    "BertModel": BERT,
}


def arch_of(config: Any) -> tuple[str, Arch]:
    """The architecture name in a transformers config and its adapter.

    Raises:
        VerifyError: the architecture is not one verify can run stage by stage.
    """
    archs = getattr(config, "architectures", None) or []
    name = archs[0] if archs else None
    if name not in ARCHITECTURES:
        raise VerifyError(f"architecture '{name or config.model_type}' is not supported by verify "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    return name, ARCHITECTURES[name]  # type: ignore[return-value]


def load_config(folder: Path) -> Any:
    """``folder/config.json`` through transformers, which reconciles its spellings across versions
    (``torch_dtype``/``dtype``, ``rope_theta``/``rope_parameters``).

    Raises:
        VerifyError: no config.json, or transformers cannot read it.
    """
    import transformers

    if not (folder / "config.json").is_file():
        raise VerifyError(f"'{folder}': no config.json (verify builds the model from it)")
    try:
        return transformers.AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as exc:
        raise VerifyError(f"'{folder / 'config.json'}': transformers cannot read it ({exc})") from None


def skeleton(config: Any, dtype: torch.dtype) -> Any:
    """The whole model on the meta device: every module exists, no tensor holds memory."""
    import torch
    import transformers

    name, _ = arch_of(config)
    with torch.device("meta"):
        model = getattr(transformers, name)._from_config(config, dtype=dtype,
                                                         attn_implementation=ATTN_IMPLEMENTATION)
    return model.eval()  # modules start in training mode; GPT-2 and BERT have dropout


@dataclass
class Stage:
    """A materialised stage. ``loaded`` maps each model key to the checkpoint name it was read from."""

    model: Any
    arch: Arch
    blocks: tuple[int, int]
    is_first: bool
    is_last: bool
    loaded: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(self.model.get_parameter(k).numel() for k in self.loaded
                   if _is_parameter(self.model, k))

    def modules(self) -> list[str]:
        return stage_modules(self.arch, self.blocks, self.is_first, self.is_last)


def stage_modules(arch: Arch, blocks: tuple[int, int], is_first: bool, is_last: bool) -> list[str]:
    """Module paths a stage runs: ``[start, end)`` blocks, plus the first/last modules at the ends."""
    names = list(arch.first) if is_first else []
    names += [f"{arch.blocks}.{i}" for i in range(*blocks)]
    return names + (list(arch.last) if is_last else [])


def _is_parameter(model: Any, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    return leaf in model.get_submodule(owner)._parameters


def _exists(model: Any, path: str) -> bool:
    try:
        return model.get_submodule(path) is not None
    except AttributeError:
        return False


def needed_keys(model: Any, modules: list[str]) -> list[str]:
    """Parameters and persistent buffers of these modules, as model keys (tied parameters listed once each)."""
    keys = []
    for path in modules:
        if not _exists(model, path):
            continue  # e.g. a BertModel built without its pooler
        for sub_name, sub in model.get_submodule(path).named_modules(remove_duplicate=False):
            prefix = f"{path}.{sub_name}" if sub_name else path
            keys += [f"{prefix}.{n}" for n, p in sub._parameters.items() if p is not None]
            keys += [f"{prefix}.{n}" for n, b in sub._buffers.items()
                     if b is not None and n not in sub._non_persistent_buffers_set]
    return list(dict.fromkeys(keys))


def checkpoint_names(model: Any, key: str) -> list[str]:
    """Names a checkpoint may store model key ``key`` under, best first: the key, the tied source (a tied
    head is not stored), and each without or with the base-model prefix (GPT-2 on the Hub has ``h.0...``, not
    ``transformer.h.0...``; a ``BertForMaskedLM`` checkpoint has ``bert.embeddings...``)."""
    keys = [key]
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if key in tied:
        keys.append(tied[key])
    base = getattr(model, "base_model_prefix", "")
    out = []
    for k in keys:
        out += [k, k.removeprefix(base + ".")] if k.startswith(base + ".") else [k, f"{base}.{k}"]
    return list(dict.fromkeys(out))


def materialise(model: Any, arch: Arch, blocks: tuple[int, int], is_first: bool, is_last: bool,
                tensors: Callable[[str], torch.Tensor], available: set[str], where: str, source: str) -> Stage:
    """Give the stage's modules real tensors, read through ``tensors(name)`` from the names in ``available``
    (``source`` names where they come from, for the messages).

    Non-persistent buffers (rotary ``inv_freq``, BERT's ``position_ids``) are not in checkpoints: they are
    recomputed by the model's own ``_init_weights``, exactly as ``from_pretrained`` does.

    Raises:
        VerifyError: a tensor the stage needs is not available (named, with ``where``), or has the wrong shape.
    """
    import torch

    stage = Stage(model, arch, blocks, is_first, is_last)
    modules = stage.modules() + [h for h in arch.helpers if _exists(model, h)]
    for path in modules:
        _init_buffers(model, path)
    for key in needed_keys(model, modules):
        name = next((n for n in checkpoint_names(model, key) if n in available), None)
        if name is None:
            tied = (getattr(model, "all_tied_weights_keys", None) or {}).get(key)
            what = f"'{tied}' (the tied '{key}')" if tied else f"'{key}'"
            raise VerifyError(f"{where}: tensor {what} is missing from {source}")
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner)
        current = module._parameters.get(leaf, module._buffers.get(leaf))
        value = tensors(name)
        if tuple(value.shape) != tuple(current.shape):
            raise VerifyError(f"{where}: tensor '{name}' has shape {list(value.shape)}, the model expects "
                              f"{list(current.shape)}")
        if value.is_floating_point() and value.dtype != current.dtype:
            value = value.to(current.dtype)
        elif value.data_ptr() % ALIGNMENT:
            value = value.clone()
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[leaf] = value
        stage.loaded[key] = name
    return stage


def _init_buffers(model: Any, path: str) -> None:
    import torch

    for sub in model.get_submodule(path).modules():
        meta = [n for n, b in sub._buffers.items() if b is not None and b.is_meta
                and n in sub._non_persistent_buffers_set]
        if meta:
            for n in meta:
                sub._buffers[n] = torch.empty_like(sub._buffers[n], device="cpu")
            with torch.no_grad():
                model._init_weights(sub)


def align(model: Any) -> None:
    """Copy every parameter and buffer that is not `ALIGNMENT`-byte aligned into fresh (aligned) memory; a tied
    parameter stays one parameter."""
    import torch

    copies: dict[int, Any] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for n, t in store.items():
                if t is None or t.is_meta or not t.data_ptr() % ALIGNMENT:
                    continue
                if id(t) not in copies:
                    copy = t.detach().clone()
                    copies[id(t)] = torch.nn.Parameter(copy, requires_grad=False) if store is module._parameters \
                        else copy
                store[n] = copies[id(t)]


class ShardReader:
    """Reads a safetensors file tensor by tensor with plain reads into fresh torch memory: one copy, aligned, and
    no memory-mapped pages left resident (``safe_open`` maps the file, and the mapped pages count in RSS on top of
    the copies until it closes, which doubled a stage's peak).

    Raises:
        CheckpointError: the file's header is corrupt (from williw.header).
    """

    def __init__(self, path: Path) -> None:
        import os

        from williw.header import read_header

        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        header = read_header(self._file, str(path), os.fstat(self._file.fileno()).st_size)
        self.entries = {e.name: e for e in header.entries}

    def keys(self) -> set[str]:
        return set(self.entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        import torch

        from williw.units import SAFETENSORS_TO_TORCH

        e = self.entries[name]
        out = torch.empty(e.end - e.start, dtype=torch.uint8)
        self._file.seek(e.start)
        if self._file.readinto(out.numpy()) != e.end - e.start:
            raise VerifyError(f"'{self.path}': tensor '{name}' is cut short")
        return out.view(getattr(torch, SAFETENSORS_TO_TORCH[e.dtype])).reshape(e.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def release(model: Any, modules: list[str]) -> None:
    """Send a stage's modules back to the meta device, freeing their memory."""
    for path in modules:
        if _exists(model, path):
            model.get_submodule(path).to("meta")


# ---- running: each mirrors its model's forward in transformers 5 (see the modeling_*.py files) ----

def run_stage(stage: Stage, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run a stage on token ids (first stage) or the previous stage's hidden state.

    Returns:
        ``{"hidden": ...}`` for an inner stage; the architecture's outputs (``logits``, or ``last_hidden_state``
        and ``pooler_output``) for the last one.
    """
    import torch

    runner = {"llama": _run_llama, "gpt2": _run_gpt2, "bert": _run_bert}[stage.arch.name]
    with torch.no_grad():
        return runner(stage, x)


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _llama_mask_kind(config: Any, i: int) -> str:
    if config.model_type == "mistral":  # MistralModel ignores layer_types: one mask for every layer
        return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    types = getattr(config, "layer_types", None)
    return types[i] if types else "full_attention"


def _run_llama(stage: Stage, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    m, config = stage.model, stage.model.config
    hidden = m.model.embed_tokens(x) if stage.is_first else x
    position_ids = _positions(hidden)
    kinds = {_llama_mask_kind(config, i) for i in range(*stage.blocks)}
    make = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {k: make[k](config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
                        position_ids=position_ids) for k in kinds}
    position_embeddings = m.model.rotary_emb(hidden, position_ids=position_ids)
    for i in range(*stage.blocks):
        hidden = m.model.layers[i](hidden, attention_mask=masks[_llama_mask_kind(config, i)],
                                   position_embeddings=position_embeddings, position_ids=position_ids,
                                   past_key_values=None, use_cache=False)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    if not stage.is_last:
        return {"hidden": hidden}
    return {"logits": m.lm_head(m.model.norm(hidden))}


def _run_gpt2(stage: Stage, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from transformers.masking_utils import create_causal_mask

    t = stage.model.transformer
    if stage.is_first:
        embeds = t.wte(x)
        hidden = t.drop(embeds + t.wpe(_positions(embeds)))
    else:
        hidden = x
    position_ids = _positions(hidden)
    mask = create_causal_mask(config=stage.model.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=None, position_ids=position_ids)
    for i in range(*stage.blocks):
        hidden = t.h[i](hidden, None, mask, None, encoder_attention_mask=None, use_cache=False,
                        position_ids=position_ids)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    if not stage.is_last:
        return {"hidden": hidden}
    return {"logits": stage.model.lm_head(t.ln_f(hidden))}


def _run_bert(stage: Stage, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from transformers.masking_utils import create_bidirectional_mask

    m = stage.model
    hidden = m.embeddings(input_ids=x, past_key_values_length=0) if stage.is_first else x
    mask = create_bidirectional_mask(config=m.config, inputs_embeds=hidden, attention_mask=None)
    for i in range(*stage.blocks):
        hidden = m.encoder.layer[i](hidden, mask, None, encoder_attention_mask=None, past_key_values=None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    if not stage.is_last:
        return {"hidden": hidden}
    out = {"last_hidden_state": hidden}
    if m.pooler is not None:
        out["pooler_output"] = m.pooler(hidden)
    return out
