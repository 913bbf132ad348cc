"""List every tensor of a local model folder from file headers, never reading tensor data.

Which files are the checkpoint is decided once, by `checkpoint_files` (rules in `williw.weightfiles`: the index's
shards, else ``model.safetensors``, else the other safetensors, never Mistral's ``consolidated*`` copy, a
subfolder, or a second copy in another dtype; torch pickles only without safetensors). Safetensors are read
from their headers only; ``.bin``/``.pth``/``.pt`` through ``torch.load(mmap=True, weights_only=True)``, which
maps the file instead of reading it (needs torch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from williw import jsonio
from williw.config import ModelConfig, read_config
from williw.errors import CheckpointError, require_torch
from williw.header import read_header
from williw.units import TORCH_TO_SAFETENSORS, numel, tensor_nbytes
from williw.weightfiles import (
    MISTRAL_NATIVE,
    SAFETENSORS_INDEX,
    TORCH_INDEX,
    TORCH_SUFFIXES,
    is_weights_name,
    select_weight_files,
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint.

    ``start``/``end`` are absolute byte offsets in ``file``, half-open ``[start, end)``; they are None for torch
    pickles, whose storage layout is not a plain byte range.
    """

    name: str
    dtype: str  # safetensors code: F32, BF16, F8_E4M3, I64, ...
    shape: tuple[int, ...]
    file: str  # relative to the model folder
    start: int | None = None
    end: int | None = None

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        nbytes = tensor_nbytes(self.dtype, self.shape)
        assert nbytes is not None  # checked when the header was parsed
        return nbytes


@dataclass(frozen=True)
class Checkpoint:
    """A model folder: its weight files, their tensors in file order, and its config (if any)."""

    path: Path
    format: Literal["safetensors", "torch"]
    files: tuple[str, ...]
    tensors: tuple[TensorInfo, ...]
    config: ModelConfig | None
    ignored: tuple[str, ...] = ()  # weight-like files that are not the checkpoint (see `checkpoint_files`)

    @cached_property
    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a model folder (or a single weights file) and list its tensors.

    Raises:
        CheckpointError: missing folder, no weights, corrupt header, index naming a missing shard, ...
        MissingDependency: the folder holds only torch pickles and torch is not installed.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}': no such file or folder")
    if path.is_file():
        model_dir, files = path.parent, [path.name]
        fmt = "safetensors" if path.suffix == ".safetensors" else "torch" if path.suffix in TORCH_SUFFIXES else None
        if fmt is None:
            raise CheckpointError(f"'{path}': not a weights file (expected .safetensors, .bin, .pth or .pt)")
        weight_map, ignored = None, []
    else:
        model_dir = path
        fmt, files, weight_map, ignored = _discover(path)
    config = read_config(model_dir)
    tensors = _safetensors_tensors(model_dir, files) if fmt == "safetensors" else _torch_tensors(model_dir, files)
    if weight_map is not None:
        _check_index(model_dir, tensors, weight_map)
    return Checkpoint(path=model_dir, format=fmt, files=tuple(files), tensors=tuple(tensors), config=config,
                      ignored=tuple(ignored))


def checkpoint_files(folder: str | os.PathLike[str]) -> tuple[list[Path], list[Path]]:
    """The files that are the checkpoint of a model folder, and the weight-like files left out.

    The one rule every step uses (download, metadata, split, pull, verify's reference): see
    `williw.weightfiles`. Among several safetensors files without an index, a file whose tensors all
    appear in a file before it (a second copy in another dtype) is left out too.

    Returns:
        ``(chosen, ignored)``: paths in the folder, chosen in reading order, ignored sorted (subfolders included).

    Raises:
        CheckpointError: no weights (naming a subfolder that holds a model, when there is one), or a bad index.
    """
    folder = Path(folder)
    _fmt, files, _weight_map, ignored = _discover(folder)
    return [folder / f for f in files], [folder / f for f in ignored]


def _listing(model_dir: Path) -> list[str]:
    names = []
    for entry in sorted(model_dir.iterdir()):
        if entry.is_file():
            names.append(entry.name)
        elif entry.is_dir() and not entry.name.startswith("."):
            names.extend(f"{entry.name}/{p.name}" for p in sorted(entry.iterdir()) if p.is_file())
    return names


def _discover(model_dir: Path) -> tuple[Literal["safetensors", "torch"], list[str], dict[str, str] | None,
                                        list[str]]:
    names = _listing(model_dir)
    weight_map = None
    index_files = None
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        if index_name in names:
            weight_map = _read_index(model_dir, model_dir / index_name)
            index_files = list(dict.fromkeys(weight_map.values()))
            break
    chosen, ignored = select_weight_files(names, index_files)
    if not chosen:
        raise CheckpointError(_no_weights(model_dir, names))
    fmt: Literal["safetensors", "torch"] = "safetensors" if chosen[0].endswith(".safetensors") else "torch"
    if index_files is not None and (fmt == "safetensors") == (index_files[0].endswith(".safetensors")):
        return fmt, index_files, weight_map, ignored
    if fmt == "safetensors" and len(chosen) > 1:
        chosen, copies = _drop_copies(model_dir, chosen)
        ignored = sorted(ignored + copies)
    return fmt, chosen, None, ignored


def _drop_copies(model_dir: Path, files: list[str]) -> tuple[list[str], list[str]]:
    """Leave out a file whose tensors all appear in a file kept before it (the same weights in another dtype)."""
    seen: set[str] = set()
    kept, copies = [], []
    for file in files:
        path = model_dir / file
        with open(path, "rb") as f:
            names = {e.name for e in read_header(f, str(path), os.fstat(f.fileno()).st_size).entries}
        if names and names <= seen:
            copies.append(file)
        else:
            kept.append(file)
            seen |= names
    return kept, copies


def _no_weights(model_dir: Path, names: list[str]) -> str:
    nested = sorted({n.split("/", 1)[0] for n in names if "/" in n and is_weights_name(n.rsplit("/", 1)[1])})
    holders = [d for d in nested if f"{d}/config.json" in names] or nested
    if holders:
        kind = " (a sentence-transformers folder)" if "modules.json" in names else ""
        return (f"'{model_dir}': no weights at the top level{kind}; the model is in the subfolder "
                f"'{holders[0]}': use '{model_dir / holders[0]}' as the model folder")
    if any(n.startswith(MISTRAL_NATIVE) and n.endswith(".safetensors") for n in names):
        return (f"'{model_dir}': only Mistral's own consolidated*.safetensors, which williw does not read; use the "
                "transformers layout (config.json + model.safetensors) of the same model")
    return (f"'{model_dir}': no weights found (expected model.safetensors, a safetensors index, pytorch_model.bin "
            "or a .pth/.pt state dict)")


def _read_index(model_dir: Path, index: Path) -> dict[str, str]:
    data = jsonio.loads(index.read_bytes(), f"'{index}'", CheckpointError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"'{index}': expected a non-empty 'weight_map' object of tensor name -> file")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not is_plain_filename(file):
            raise CheckpointError(f"'{index}': tensor '{name}' maps to {file!r}, expected a file name in the folder")
        if not (model_dir / file).is_file():
            raise CheckpointError(f"'{index}': tensor '{name}' is in shard '{file}', which is missing")
    return weight_map


def is_plain_filename(name: str) -> bool:
    """True for a bare file name: no folder part, no '..', not hidden, not absolute."""
    return bool(name) and name == os.path.basename(name) and name not in (".", "..") and "\\" not in name \
        and not name.startswith(".") and "\x00" not in name


def _safetensors_tensors(model_dir: Path, files: list[str]) -> list[TensorInfo]:
    tensors: list[TensorInfo] = []
    seen: dict[str, str] = {}
    for file in files:
        path = model_dir / file
        with open(path, "rb") as f:
            header = read_header(f, str(path), os.fstat(f.fileno()).st_size)
        for e in header.entries:
            if e.name in seen:
                raise CheckpointError(f"'{path}': tensor '{e.name}' is also in '{seen[e.name]}'")
            seen[e.name] = file
            tensors.append(TensorInfo(e.name, e.dtype, e.shape, file, e.start, e.end))
    return tensors


def _torch_tensors(model_dir: Path, files: list[str]) -> list[TensorInfo]:
    require_torch(f"reading '{model_dir / files[0]}'")
    tensors: list[TensorInfo] = []
    seen: dict[str, str] = {}
    for file in files:
        for name, tensor in load_torch_state_dict(model_dir / file).items():
            if name in seen:
                raise CheckpointError(f"'{model_dir / file}': tensor '{name}' is also in '{seen[name]}'")
            seen[name] = file
            dtype = TORCH_TO_SAFETENSORS.get(str(tensor.dtype).removeprefix("torch."))
            if dtype is None:
                raise CheckpointError(f"'{model_dir / file}': tensor '{name}' has unsupported dtype {tensor.dtype}")
            tensors.append(TensorInfo(name, dtype, tuple(tensor.shape), file))
    return tensors


def load_torch_state_dict(path: Path) -> dict:
    """``torch.load`` a state dict memory-mapped (weights stay on disk until touched), unwrapping
    ``{"state_dict": ...}`` / ``{"model": ...}`` containers.

    Raises:
        CheckpointError: not a loadable torch file, or not a dict of tensors.
    """
    import torch

    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        try:  # legacy (pre-1.6, non-zip) files cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
            raise CheckpointError(f"'{path}': not a loadable torch state dict ({exc})") from None
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"'{path}': not a loadable torch state dict ({exc})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict) and len(obj) <= 3:
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"'{path}': expected a dict of tensor name -> tensor")
    return obj


def _check_index(model_dir: Path, tensors: list[TensorInfo], weight_map: dict[str, str]) -> None:
    for t in tensors:
        if t.name not in weight_map:
            raise CheckpointError(f"'{model_dir}': tensor '{t.name}' in '{t.file}' is not in the index")
        if weight_map[t.name] != t.file:
            raise CheckpointError(
                f"'{model_dir}': the index puts tensor '{t.name}' in '{weight_map[t.name]}' but it is in '{t.file}'"
            )
    names = {t.name for t in tensors}
    for name, file in weight_map.items():
        if name not in names:
            raise CheckpointError(f"'{model_dir}': the index names tensor '{name}' in '{file}', which lacks it")
