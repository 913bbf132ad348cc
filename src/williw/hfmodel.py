"""The transformers model behind a checkpoint, as verify and the runtime need it: its config, its class (refused
in one line when its stages cannot run from their shards alone), a skeleton on the meta device, its block stack.

torch and transformers are imported inside the functions (they are an extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from williw.errors import VerifyError

if TYPE_CHECKING:
    import torch

# Math libraries may take another code path for data that is not 64-byte aligned (MKL documents that results can
# then differ in the last bits). safetensors aligns tensors to 8 bytes in a file, and from_pretrained keeps the
# memory-mapped file's tensors, so their alignment depends on the file: a tiny BERT's pooler gave 4.5e-08 apart with
# the same weight at two alignments. Both the reference and the stages therefore copy unaligned tensors.
ALIGNMENT = 64

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


def model_class(config: Any, *, for_generation: bool = False) -> tuple[str, Any]:
    """The transformers class named by ``config.architectures[0]``, refused with one line when its stages cannot
    run from their shards alone.

    Args:
        for_generation: word the refusal for generation (`GenerateError`) instead of verify (`VerifyError`).

    Raises:
        VerifyError: a quantized checkpoint, an architecture whose blocks do not form one chain passing one hidden
            state (encoder-decoder, vision-language, audio), or a class this transformers release does not have.
        GenerateError: the same, with ``for_generation``.
    """
    import transformers

    from williw.errors import GenerateError

    error = GenerateError if for_generation else VerifyError
    archs = getattr(config, "architectures", None) or []
    name = archs[0] if archs else None
    label = name or config.model_type
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = (quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None))
        method = getattr(method, "value", method) or "an unknown method"
        if for_generation:
            raise error(f"architecture '{label}' is quantized with {method} (config.json quantization_config): "
                        f"its stages run float weights and have no {method} kernels to dequantize them; place an "
                        f"unquantized copy of the model to generate with it")
        raise error(f"architecture '{label}' is quantized with {method} (config.json quantization_config): "
                    f"verify compares float outputs bit for bit and would need the {method} kernels to "
                    f"dequantize each stage; verify an unquantized copy of the model instead")
    why = _not_a_chain(config)
    if why:
        what = "cannot generate over a pipeline of stages" if for_generation else "is not supported by verify"
        raise error(f"architecture '{label}' {what}: {why}")
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise error(f"architecture '{label}' is not a class of transformers {transformers.__version__} "
                    f"(config.json architectures); upgrade transformers or fix config.json")
    return name, cls  # type: ignore[return-value]


def _not_a_chain(config: Any) -> str | None:
    """Why the model's blocks do not form one chain that passes one hidden state, or None."""
    if getattr(config, "is_encoder_decoder", False):
        return ("it is an encoder-decoder model (config.json is_encoder_decoder): every decoder block also reads "
                "the encoder's output, so the stages do not pass one hidden state")
    # A sub-config is a model of its own (a vision tower, an audio encoder) when it counts layers; MPT's and DBRX's
    # attn_config/ffn_config are only settings of the one decoder.
    parts = [k for k in (getattr(config, "sub_configs", None) or {}) if k != "text_config"
             and any(isinstance(getattr(getattr(config, k, None), f, None), int) for f in _LAYER_COUNTS)]
    if parts:
        return (f"it has sub-models ({', '.join(sorted(parts))} in config.json) that run beside the language model, "
                f"so its blocks do not form one chain passing one hidden state")
    return None


_LAYER_COUNTS = ("num_hidden_layers", "depth", "num_layers", "encoder_layers", "decoder_layers", "n_layer")


def skeleton(cls: Any, config: Any, dtype: torch.dtype) -> Any:
    """The whole model on the meta device: every module exists, no tensor holds memory."""
    import torch

    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    return model.eval()  # modules start in training mode; GPT-2 and BERT have dropout


def init_buffers(model: Any) -> None:
    """Non-persistent buffers (rotary ``inv_freq``, Falcon-H1's ``mup_vector``) computed as ``from_pretrained``
    computes them: put on the CPU, then the model's own ``initialize_weights`` with every parameter and persistent
    buffer marked initialised, so only these buffers are written. The whole model's initialisation runs, not each
    owner's: Falcon-H1 fills its layers' ``mup_vector`` from the parent model's ``_init_weights``, so a buffer left
    to its owner stayed uninitialised memory and a stage computed NaN. Must run before blocks are swapped out."""
    import torch

    for sub in model.modules():
        for n, b in sub._buffers.items():
            if b is None:
                continue
            if n in sub._non_persistent_buffers_set:
                if b.is_meta:
                    sub._buffers[n] = torch.empty_like(b, device="cpu")
            else:
                b._is_hf_initialized = True
        for p in sub._parameters.values():
            if p is not None:
                p._is_hf_initialized = True
    model.initialize_weights()


def refuse_side_inputs(model: Any, stack: Any, block: Any) -> None:
    """Refuse a model whose blocks receive, besides the hidden state, a tensor computed from the token embeddings
    (Gemma 4's and Gemma 3n's ``per_layer_input``): a stage receives only the hidden state, so a later stage would
    compute that input from nothing. Found by autograd, not by name: the skeleton runs with its input embeddings'
    output requiring a gradient, and any other argument of block 0 that requires one depends on it (positions,
    masks and rotary tables do not). Blocks must already be `Passthrough` modules.

    Raises:
        VerifyError: one line naming the architecture and the argument.
    """
    import inspect

    import torch

    seen: list[str] = []

    def look(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        names = [*inspect.signature(block.forward).parameters, *(f"argument {i}" for i in range(len(args)))]
        named = list(zip(names[1:], args[1:], strict=False))
        named += [(k, v) for k, v in kwargs.items() if k != "hidden_states" or not args]
        named = named if args else [(k, v) for k, v in named if k != "hidden_states"]
        seen.extend(k for k, v in named if isinstance(v, torch.Tensor) and v.requires_grad)

    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    hooks = [stack[0].register_forward_pre_hook(look, with_kwargs=True),
             embedding.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True)
                                             if out.is_floating_point() else out)]
    try:
        with torch.enable_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=False)
    except Exception:  # a model that cannot run this way: the phase trace below tells
        pass
    finally:
        for h in hooks:
            h.remove()
    if seen:
        raise VerifyError(f"architecture '{type(model).__name__}': its blocks also receive '{seen[0]}', computed "
                          f"from the token embeddings, besides the hidden state; pipeline stages pass only the "
                          f"hidden state, so its blocks cannot run as separate stages")


def block_stack(model: Any) -> tuple[str, Any]:
    """The ``ModuleList`` of transformer blocks: the one whose length is the config's ``num_hidden_layers`` (lists
    nested in another such list's blocks do not count).

    Raises:
        VerifyError: no module list, or more than one, has that length.
    """
    import torch

    n = model.config.get_text_config().num_hidden_layers
    found = [(p, m) for p, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    # A list inside another's items is part of a block (StableLM's per-head q_layernorm.norms when heads == layers)
    found = [(p, m) for p, m in found if not any(p.startswith(f"{q}.") for q, _ in found if q != p)]
    if len(found) != 1:
        what = "no module list" if not found else f"{len(found)} module lists ({', '.join(p for p, _ in found)})"
        raise VerifyError(f"architecture '{type(model).__name__}': {what} of num_hidden_layers = {n} blocks, "
                          f"expected exactly one block stack")
    return found[0]


def align(model: Any) -> None:
    """Copy every parameter and buffer that is not `ALIGNMENT`-byte aligned into fresh (aligned) memory; a tied
    parameter stays one parameter. Placeholders (zero strides) hold one element and are left alone."""
    import torch

    copies: dict[int, Any] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for n, t in list(store.items()):
                if t is None or t.is_meta or getattr(t, "_williw_placeholder", False) or not t.data_ptr() % ALIGNMENT:
                    continue
                if id(t) not in copies:
                    copy = t.detach().clone()
                    copies[id(t)] = torch.nn.Parameter(copy, requires_grad=False) if store is module._parameters \
                        else copy
                store[n] = copies[id(t)]
