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


def model_class(config: Any) -> tuple[str, Any]:
    """The transformers class named by ``config.architectures[0]``, refused with one line when its stages cannot
    run from their shards alone.

    Raises:
        VerifyError: a quantized checkpoint, an architecture whose blocks do not form one chain passing one hidden
            state (encoder-decoder, vision-language, audio), or a class this transformers release does not have.
    """
    import transformers

    archs = getattr(config, "architectures", None) or []
    name = archs[0] if archs else None
    label = name or config.model_type
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = (quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None))
        method = getattr(method, "value", method) or "an unknown method"
        raise VerifyError(f"architecture '{label}' is quantized with {method} (config.json quantization_config): "
                          f"verify compares float outputs bit for bit and would need the {method} kernels to "
                          f"dequantize each stage; verify an unquantized copy of the model instead")
    why = _not_a_chain(config)
    if why:
        raise VerifyError(f"architecture '{label}' is not supported by verify: {why}")
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise VerifyError(f"architecture '{label}' is not a class of transformers {transformers.__version__} "
                          f"(config.json architectures); upgrade transformers or fix config.json")
    return name, cls  # type: ignore[return-value]


def _not_a_chain(config: Any) -> str | None:
    """Why the model's blocks do not form one chain that passes one hidden state, or None."""
    if getattr(config, "is_encoder_decoder", False):
        return ("it is an encoder-decoder model (config.json is_encoder_decoder): every decoder block also reads "
                "the encoder's output, so the stages do not pass one hidden state")
    parts = [k for k in (getattr(config, "sub_configs", None) or {}) if k != "text_config"]
    if parts:
        return (f"it has sub-models ({', '.join(sorted(parts))} in config.json) that run beside the language model, "
                f"so its blocks do not form one chain passing one hidden state")
    return None


def skeleton(cls: Any, config: Any, dtype: torch.dtype) -> Any:
    """The whole model on the meta device: every module exists, no tensor holds memory."""
    import torch

    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    return model.eval()  # modules start in training mode; GPT-2 and BERT have dropout


def block_stack(model: Any) -> tuple[str, Any]:
    """The ``ModuleList`` of transformer blocks: the one whose length is the config's ``num_hidden_layers``.

    Raises:
        VerifyError: no module list, or more than one, has that length.
    """
    import torch

    n = model.config.get_text_config().num_hidden_layers
    found = [(p, m) for p, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
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
