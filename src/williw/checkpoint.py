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
from typing import Literal, Protocol

from williw import jsonio
from williw.config import ModelConfig, config_from_bytes, read_config
from williw.errors import CheckpointError, require_torch
from williw.header import SafetensorsHeader, read_header
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
    location: str | None = None  # a remote model's repo id or URL (``path`` is then only its name)
    commit: str | None = None  # the Hub commit a remote model was read at

    def label(self, name: str) -> str:
        """How a file of the model is named in messages: its path, or ``<repo>/<name>`` for a remote model."""
        return f"{self.location.rstrip('/')}/{name}" if self.location else str(self.path / name)

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
    if not path.is_file():
        return open_model_files(LocalFiles(path), path)
    model_dir, files = path.parent, [path.name]
    fmt = "safetensors" if path.suffix == ".safetensors" else "torch" if path.suffix in TORCH_SUFFIXES else None
    if fmt is None:
        raise CheckpointError(f"'{path}': not a weights file (expected .safetensors, .bin, .pth or .pt)")
    source = LocalFiles(model_dir)
    tensors = _safetensors_tensors(source, files) if fmt == "safetensors" else source.torch_tensors(files)
    return Checkpoint(path=model_dir, format=fmt, files=tuple(files), tensors=tuple(tensors),
                      config=read_config(model_dir))


class ModelFiles(Protocol):
    """Where a model's files are read from: a local folder (`LocalFiles`) or a remote repo or server
    (`williw.remote_checkpoint`). Every rule of this module runs on this interface, so a folder and the same
    files on the Hub give the same checkpoint."""

    where: str  # the folder, repo id or URL, as messages name it

    def label(self, name: str) -> str:
        """How file ``name`` is named in messages."""

    def names(self) -> list[str]:
        """The top-level files and those one folder down (``sub/name``), not in hidden folders."""

    def read_small(self, name: str) -> bytes | None:
        """The whole of a small file (config, index), or None when it is missing."""

    def headers(self, files: list[str]) -> dict[str, SafetensorsHeader]:
        """The validated safetensors headers of ``files``."""

    def torch_tensors(self, files: list[str]) -> list[TensorInfo]:
        """The tensors of torch pickles (local only: a remote pickle cannot be read without downloading it)."""


class LocalFiles:
    """A model folder on this machine, as `ModelFiles`."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir
        self.where = str(model_dir)
        self._headers: dict[str, SafetensorsHeader] = {}

    def label(self, name: str) -> str:
        return str(self.dir / name)

    def names(self) -> list[str]:
        return _listing(self.dir)

    def read_small(self, name: str) -> bytes | None:
        path = self.dir / name
        return path.read_bytes() if path.is_file() else None

    def headers(self, files: list[str]) -> dict[str, SafetensorsHeader]:
        for file in files:
            if file not in self._headers:
                path = self.dir / file
                with open(path, "rb") as f:
                    self._headers[file] = read_header(f, str(path), os.fstat(f.fileno()).st_size)
        return {f: self._headers[f] for f in files}

    def torch_tensors(self, files: list[str]) -> list[TensorInfo]:
        return _torch_tensors(self.dir, files)


def open_model_files(source: ModelFiles, path: Path, *, location: str | None = None,
                     commit: str | None = None) -> Checkpoint:
    """The checkpoint of a model's files, wherever they are: the rules of `open_checkpoint` on ``source``.

    Args:
        source: the files (`LocalFiles`, or a remote source from `williw.remote_checkpoint`).
        path: the folder (or, for a remote model, its name as a path).
        location, commit: recorded in the `Checkpoint` for a remote model.

    Raises:
        CheckpointError: no weights, a corrupt header or config, an index naming a missing shard, ...
    """
    fmt, files, weight_map, ignored = _discover(source)
    raw_config = source.read_small("config.json")
    config = None if raw_config is None else config_from_bytes(raw_config, source.label("config.json"))
    tensors = _safetensors_tensors(source, files) if fmt == "safetensors" else source.torch_tensors(files)
    if weight_map is not None:
        _check_index(source.where, tensors, weight_map)
    return Checkpoint(path=path, format=fmt, files=tuple(files), tensors=tuple(tensors), config=config,
                      ignored=tuple(ignored), location=location, commit=commit)


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
    _fmt, files, _weight_map, ignored = _discover(LocalFiles(folder))
    return [folder / f for f in files], [folder / f for f in ignored]


def _listing(model_dir: Path) -> list[str]:
    names = []
    for entry in sorted(model_dir.iterdir()):
        if entry.is_file():
            names.append(entry.name)
        elif entry.is_dir() and not entry.name.startswith("."):
            names.extend(f"{entry.name}/{p.name}" for p in sorted(entry.iterdir()) if p.is_file())
    return names


def _discover(source: ModelFiles) -> tuple[Literal["safetensors", "torch"], list[str], dict[str, str] | None,
                                           list[str]]:
    names = source.names()
    weight_map = None
    index_files = None
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        if index_name in names:
            weight_map = _read_index(source, index_name, names)
            index_files = list(dict.fromkeys(weight_map.values()))
            break
    chosen, ignored = select_weight_files(names, index_files)
    if not chosen:
        raise CheckpointError(_no_weights(source, names))
    fmt: Literal["safetensors", "torch"] = "safetensors" if chosen[0].endswith(".safetensors") else "torch"
    if index_files is not None and (fmt == "safetensors") == (index_files[0].endswith(".safetensors")):
        return fmt, index_files, weight_map, ignored
    if fmt == "safetensors" and len(chosen) > 1:
        chosen, copies = _drop_copies(source, chosen)
        ignored = sorted(ignored + copies)
    return fmt, chosen, None, ignored


def _drop_copies(source: ModelFiles, files: list[str]) -> tuple[list[str], list[str]]:
    """Leave out a file whose tensors all appear in a file kept before it (the same weights in another dtype)."""
    headers = source.headers(files)
    seen: set[str] = set()
    kept, copies = [], []
    for file in files:
        names = {e.name for e in headers[file].entries}
        if names and names <= seen:
            copies.append(file)
        else:
            kept.append(file)
            seen |= names
    return kept, copies


def _no_weights(source: ModelFiles, names: list[str]) -> str:
    model_dir = source.where
    nested = sorted({n.split("/", 1)[0] for n in names if "/" in n and is_weights_name(n.rsplit("/", 1)[1])})
    holders = [d for d in nested if f"{d}/config.json" in names] or nested
    if holders:
        kind = " (a sentence-transformers folder)" if "modules.json" in names else ""
        return (f"'{model_dir}': no weights at the top level{kind}; the model is in the subfolder "
                f"'{holders[0]}': use '{source.label(holders[0])}' as the model folder")
    if any(n.startswith(MISTRAL_NATIVE) and n.endswith(".safetensors") for n in names):
        return (f"'{model_dir}': only Mistral's own consolidated*.safetensors, which williw does not read; use the "
                "transformers layout (config.json + model.safetensors) of the same model")
    return (f"'{model_dir}': no weights found (expected model.safetensors, a safetensors index, pytorch_model.bin "
            "or a .pth/.pt state dict)")


def _read_index(source: ModelFiles, index_name: str, names: list[str]) -> dict[str, str]:
    index = source.label(index_name)
    data = jsonio.loads(source.read_small(index_name) or b"", f"'{index}'", CheckpointError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"'{index}': expected a non-empty 'weight_map' object of tensor name -> file")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not is_plain_filename(file):
            raise CheckpointError(f"'{index}': tensor '{name}' maps to {file!r}, expected a file name in the folder")
        if file not in names:
            raise CheckpointError(f"'{index}': tensor '{name}' is in shard '{file}', which is missing")
    return weight_map


def is_plain_filename(name: str) -> bool:
    """True for a bare file name: no folder part, no '..', not hidden, not absolute."""
    return bool(name) and name == os.path.basename(name) and name not in (".", "..") and "\\" not in name \
        and not name.startswith(".") and "\x00" not in name


def _safetensors_tensors(source: ModelFiles, files: list[str]) -> list[TensorInfo]:
    tensors: list[TensorInfo] = []
    seen: dict[str, str] = {}
    headers = source.headers(files)
    for file in files:
        for e in headers[file].entries:
            if e.name in seen:
                raise CheckpointError(f"'{source.label(file)}': tensor '{e.name}' is also in '{seen[e.name]}'")
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


def _check_index(model_dir: str, tensors: list[TensorInfo], weight_map: dict[str, str]) -> None:
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
