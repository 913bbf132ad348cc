"""Pipeline stages of a transformers model, built from one shard each and run through the model's own ``forward``.

A stage is the model skeleton from ``config.json`` on the meta device (no memory) in which:

- the blocks of the stage get real weights, loaded by transformers' own loader (so checkpoint renamings and
  fusions, e.g. per-expert MoE tensors into one ``experts.gate_up_proj``, are the library's, not ours);
- the blocks outside the stage are replaced by `Passthrough` modules;
- the embeddings (first stage) and the final norm and head (last stage) get real weights; every other tensor is a
  zero-stride placeholder (``torch.zeros(()).expand(shape)``: the right shape and dtype, no memory), so the model's
  forward can compute masks and rotary embeddings from real, correctly shaped tensors.

The stage then runs the model's own ``forward``: a forward pre-hook on its first block swaps in the hidden state
received from the previous stage, and a forward hook on its last block captures the hidden state to send and stops
the forward there. No modeling code is copied, so a new decoder family that transformers builds needs no change.

Which modules run before and after the block stack is not guessed from names either: `_trace_phases` runs the
skeleton once with every block passed through and placeholders everywhere (a few KB of compute) and records, for
each parameter, whether the model uses it before the first block or after the last.

torch and transformers are imported inside the functions (they are an extra).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from williw.errors import VerifyError
from williw.hfmodel import (
    ALIGNMENT,
    align,
    block_stack,
    init_buffers,
    load_config,
    model_class,
    refuse_side_inputs,
    skeleton,
)

__all__ = ["ALIGNMENT", "Stage", "align", "block_stack", "build_stage", "load_config", "model_class",
           "model_outputs", "run_stage", "skeleton"]

if TYPE_CHECKING:
    import torch

# Output fields of a transformers ModelOutput that are not the model's result.
_NOT_OUTPUTS = {"past_key_values", "hidden_states", "attentions", "cross_attentions", "loss"}


class _StopStage(Exception):
    """Raised by the hook on a stage's last block to end the model's forward there."""


def _passthrough(block: Any) -> Any:
    """A stand-in for ``block`` that keeps its plain attributes (``attention_type``, ``layer_idx``), which some
    models' loops read from every block."""
    import torch

    class Hidden(torch.Tensor):
        """The hidden state a `Passthrough` returns. Some models' loops read a block's result as ``outputs[0]``
        or unpack it as a pair (blocks that return tuples), others use it as it is: index 0 of this tensor, and the
        first of the pair, is the tensor itself, so every reading gives the hidden state. Operations on it give
        plain tensors."""

        __torch_function__ = torch._C._disabled_torch_function_impl

        def __getitem__(self, key: Any) -> Any:
            return self if isinstance(key, int) and key == 0 else super().__getitem__(key)

        def __iter__(self) -> Any:
            # Bamba's loop unpacks ``hidden_states, attn_weights = decoder_layer(...)``. Only the model's loop
            # between blocks sees a stand-in's result (the next real block's pre-hook replaces it).
            return iter((self, None))

    class Passthrough(torch.nn.Module):
        """A block of another stage: returns its hidden state unchanged (the next block's pre-hook replaces it)."""

        def forward(self, hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
            if hidden_states is None:  # passed by keyword
                hidden_states = next(v for k, v in kwargs.items() if k.endswith("hidden_states"))
            return hidden_states.as_subclass(Hidden)

    stand_in = Passthrough()
    for k, v in vars(block).items():
        if not k.startswith("_") and isinstance(v, str | int | float | bool | None):
            setattr(stand_in, k, v)
    return stand_in


def _placeholder(t: torch.Tensor, parameter: bool) -> Any:
    import torch

    zero = torch.zeros((), dtype=t.dtype).expand(t.shape)
    out = torch.nn.Parameter(zero, requires_grad=False) if parameter else zero
    out._williw_placeholder = True  # type: ignore[attr-defined]
    return out


def _is_placeholder(t: Any) -> bool:
    return getattr(t, "_williw_placeholder", False)


def _tensors(model: Any) -> Iterator[tuple[Any, dict[str, Any], str, Any]]:
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for n, t in list(store.items()):
                if t is not None:
                    yield module, store, n, t


def _fill_meta(model: Any) -> None:
    """Every tensor still on the meta device becomes a placeholder."""
    for module, store, n, t in _tensors(model):
        if t.is_meta:
            store[n] = _placeholder(t, store is module._parameters)


@dataclass
class Stage:
    """A stage ready to run: blocks ``[start, end)`` of ``n_blocks``. ``loaded`` lists the model keys given real
    weights; ``ignored`` the checkpoint names the model does not know (GPT-2's stored ``attn.bias`` masks)."""

    model: Any
    blocks: tuple[int, int]
    n_blocks: int
    stack: Any
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def is_first(self) -> bool:
        return self.blocks[0] == 0

    @property
    def is_last(self) -> bool:
        return self.blocks[1] == self.n_blocks

    @property
    def parameters(self) -> int:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        unique = {id(params[k]): params[k] for k in self.loaded if k in params}
        return sum(p.numel() for p in unique.values())


def _trace_phases(model: Any, stack: Any) -> dict[str, set[str]]:
    """For each tensor key of the non-block modules, the phases (``before``/``after`` the block stack) in which
    the model's forward calls a module that owns it. Blocks must already be `Passthrough` modules."""
    import torch

    phase = ["before"]
    seen: dict[int, set[str]] = {}
    hooks = [stack[0].register_forward_pre_hook(lambda *_: phase.__setitem__(0, "inside")),
             stack[len(stack) - 1].register_forward_hook(lambda *_: phase.__setitem__(0, "after"))]
    for module in model.modules():
        own = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        if own:
            def record(_m: Any, _a: Any, own: list[Any] = own) -> None:
                for t in own:
                    seen.setdefault(id(t), set()).add(phase[0])
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {key: seen.get(id(t), set()) for key, t in _named_tensors(model)}


def build_stage(config: Any, cls: Any, blocks: tuple[int, int], state: Mapping[str, torch.Tensor],
                dtype: torch.dtype, *, where: str, source: str) -> Stage:
    """Build the stage of blocks ``[start, end)`` from the checkpoint tensors in ``state`` (a shard) alone.

    Args:
        config, cls: from `load_config` and `model_class`.
        blocks: half-open block range of the stage.
        state: checkpoint name -> tensor, as stored (transformers converts names and layouts on loading).
        dtype: compute dtype.
        where, source: the stage and the shard, for the messages.

    Raises:
        VerifyError: a tensor the stage runs is missing (named, with ``where``); the shard holds a tensor that this
            stage does not run; a tensor has the wrong shape.
    """
    model = skeleton(cls, config, dtype)
    init_buffers(model)
    path, stack = block_stack(model)
    own_blocks = list(stack)
    for i in range(len(stack)):
        stack[i] = _passthrough(own_blocks[i])
    _fill_meta(model)
    refuse_side_inputs(model, stack, own_blocks[0])
    phases = _trace_phases(model, stack)
    for module, store, n, t in _tensors(model):  # back to meta: what the loader does not fill stays missing
        if _is_placeholder(t):
            store[n] = t.to("meta") if store is module._buffers else _meta_parameter(t)
    start, end = blocks
    for i in range(start, end):
        stack[i] = own_blocks[i]
    del own_blocks
    info = _load(model, state, dtype)
    model.tie_weights()
    stage = Stage(model, blocks, len(stack), stack)
    _check_loaded(stage, path, phases, info, where, source)
    _fill_meta(model)
    align(model)
    return stage


@dataclass
class _Loaded:
    unexpected_keys: set[str]
    mismatched_keys: set[tuple[str, Any, Any]]
    conversion_errors: dict[str, str]


def _load(model: Any, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> _Loaded:
    """Load checkpoint tensors into the meta skeleton with transformers' own loader (the step of from_pretrained
    that renames and converts checkpoint tensors), leaving what ``state`` lacks on the meta device. The loader's
    signature changed within transformers 5 (5.0-5.14 take a ``tp_plan`` and return a 5-tuple; later releases
    return a LoadStateDictInfo), so both are handled here and nowhere else."""
    import inspect

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    load = LoadStateDictConfig(dtype=dtype, weight_mapping=get_model_conversion_mapping(model))
    extra = {"tp_plan": None} if "tp_plan" in inspect.signature(convert_and_load_state_dict_in_model).parameters \
        else {}
    out = convert_and_load_state_dict_in_model(model, dict(state), load, **extra)
    if len(out) == 5:
        _missing, unexpected, mismatched, _offload, errors = out
        return _Loaded(set(unexpected), set(mismatched), dict(errors or {}))
    info = out[0]
    return _Loaded(set(info.unexpected_keys), set(info.mismatched_keys), dict(info.conversion_errors or {}))


def _meta_parameter(t: Any) -> Any:
    import torch

    return torch.nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"), requires_grad=False)


def _check_loaded(stage: Stage, path: str, phases: dict[str, set[str]], info: _Loaded, where: str,
                  source: str) -> None:
    """Every tensor the stage runs is real; every checkpoint tensor the model knows belongs to this stage."""
    model = stage.model
    for key, got, want in sorted(info.mismatched_keys):
        raise VerifyError(f"{where}: tensor '{key}' has shape {list(got)}, the model expects {list(want)}")
    for key, why in sorted(info.conversion_errors.items()):
        raise VerifyError(f"{where}: transformers could not convert tensor '{key}' from {source}: {why}")
    in_blocks = tuple(f"{path}.{i}." for i in range(*stage.blocks))
    wanted = {"before"} if stage.is_first else set()
    wanted |= {"after"} if stage.is_last else set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    tensors = list(_named_tensors(model))

    def runs(key: str) -> bool:
        return key.startswith(in_blocks) or bool(phases.get(key, set()) & wanted)

    # A tied tensor (an input embedding that is also the head) is needed if any of its names is.
    needed = {id(t) for key, t in tensors if runs(key)}
    used = {id(t) for key, t in tensors if key.startswith(in_blocks) or phases.get(key)}
    loaded = []
    for key, t in tensors:
        if t.is_meta and runs(key):
            what = f"'{tied[key]}' (the tied '{key}')" if key in tied else f"'{key}'"
            raise VerifyError(f"{where}: tensor {what} is missing from {source}")
        if not t.is_meta:
            if id(t) not in needed and id(t) in used:
                raise VerifyError(f"{where}: the shard holds tensor '{key}', which this stage does not run")
            loaded.append(key)
    stage.loaded = loaded
    unexpected = sorted(info.unexpected_keys)
    other = [k for k in unexpected if _block_key(k, f"{path}.", model)]
    if other:
        raise VerifyError(f"{where}: the shard holds tensor '{other[0]}', which this stage does not run")
    stage.ignored = unexpected


def _named_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    yield from model.named_parameters(remove_duplicate=False)
    for key, b in model.named_buffers(remove_duplicate=False):
        owner, _, leaf = key.rpartition(".")
        if leaf not in model.get_submodule(owner)._non_persistent_buffers_set:
            yield key, b


def _block_key(name: str, prefix: str, model: Any) -> bool:
    """Whether a checkpoint name the stage did not load is a block's (then it belongs to another stage), possibly
    under the base-model prefix (``h.0...`` for ``transformer.h.0...``)."""
    base = getattr(model, "base_model_prefix", "")
    names = (name, f"{base}.{name}", name.removeprefix(f"{base}."))
    return any(n.startswith(prefix) and n[len(prefix):].split(".", 1)[0].isdigit() for n in names)


@contextmanager
def _hooks(stage: Stage, hidden_in: torch.Tensor | None, box: dict[str, Any]) -> Iterator[None]:
    handles = []
    start, end = stage.blocks
    if hidden_in is not None:
        def inject(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
            if args:
                return (hidden_in, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden_in}
        handles.append(stage.stack[start].register_forward_pre_hook(inject, with_kwargs=True))
    if not stage.is_last:
        def capture(_m: Any, _a: Any, out: Any) -> None:
            box["hidden"] = out[0] if isinstance(out, tuple) else out
            raise _StopStage
        handles.append(stage.stack[end - 1].register_forward_hook(capture))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_stage(stage: Stage, x: torch.Tensor, forward_kwargs: Mapping[str, Any] | None = None, *,
              cache: Any = None) -> dict[str, torch.Tensor]:
    """Run a stage through the model's own forward on token ids (first stage, ``[batch, tokens]``) or the previous
    stage's hidden state (``[batch, tokens, hidden]``); with ``cache`` (the model's own ``DynamicCache``) the
    stage's blocks append their keys and values to it.

    Args:
        forward_kwargs: more arguments for the model's forward (a KV cache, ``position_ids``; `williw.runtime`);
            without them the forward runs with ``use_cache=False``.

    Returns:
        ``{"hidden": ...}`` for an inner stage; the model's outputs (``logits``, or ``last_hidden_state`` and
        ``pooler_output``) for the last one.
    """
    import torch

    box: dict[str, Any] = {}
    # A node that never saw the tokens: the embeddings it does not hold see zeros of the right shape.
    # (at the embeddings' width: OPT's project_in maps them to the hidden size before block 0)
    if stage.is_first:
        kwargs = {"input_ids": x}
    else:
        width = stage.model.get_input_embeddings().weight.shape[-1]
        kwargs = {"inputs_embeds": torch.zeros((), dtype=x.dtype).expand(*x.shape[:-1], width)}
    with torch.no_grad(), _hooks(stage, None if stage.is_first else x, box):
        try:
            extra: dict[str, Any] = {"use_cache": False}
            if cache is not None:
                extra = {"use_cache": True, cache_argument(stage.model): cache}
            result = stage.model(**kwargs, **{**extra, **(forward_kwargs or {})})
        except _StopStage:
            return {"hidden": box["hidden"]}
    return model_outputs(result)


def cache_argument(model: Any) -> str:
    """The name of the model forward's KV-cache argument: transformers 5.x renamed ``past_key_values`` to
    ``cache``; the model's own signature says which this release takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def model_outputs(result: Any) -> dict[str, torch.Tensor]:
    """The result tensors of a transformers ModelOutput (``logits``; ``last_hidden_state``, ``pooler_output``)."""
    import torch

    return {k: v for k, v in result.items() if k not in _NOT_OUTPUTS and isinstance(v, torch.Tensor)}
