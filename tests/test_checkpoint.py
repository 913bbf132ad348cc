"""The checkpoint reader lists exactly what torch loads, from headers only, and names each kind of corruption."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from williw import tinymodels
from williw.checkpoint import open_checkpoint
from williw.errors import CheckpointError, MissingDependency

MODEL_FIXTURES = ["tiny_llama", "tiny_llama_sharded", "tiny_llama_tied_bf16", "tiny_gpt2", "tiny_bert",
                  "tiny_llama_bin", "tiny_llama_bin_sharded"]


@pytest.mark.parametrize("fixture", MODEL_FIXTURES)
def test_lists_every_tensor_as_torch_loads_it(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    reference = tinymodels.load_reference_state(path)

    ckpt = open_checkpoint(path)

    assert sorted(ckpt.by_name) == sorted(reference)
    for name, tensor in reference.items():
        info = ckpt.by_name[name]
        assert info.shape == tuple(tensor.shape), name
        assert info.dtype == {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[tensor.dtype]
        assert info.numel == tensor.numel()
        assert info.nbytes == tensor.numel() * tensor.element_size()


def test_safetensors_offsets_point_at_the_tensor_bytes(tiny_llama_sharded: Path) -> None:
    reference = tinymodels.load_reference_state(tiny_llama_sharded)
    ckpt = open_checkpoint(tiny_llama_sharded)

    assert ckpt.format == "safetensors" and len(ckpt.files) > 1
    for info in ckpt.tensors:
        with open(tiny_llama_sharded / info.file, "rb") as f:
            f.seek(info.start)
            raw = f.read(info.end - info.start)
        assert raw == reference[info.name].contiguous().view(torch.uint8).numpy().tobytes(), info.name


def test_every_safetensors_dtype(tmp_path: Path) -> None:
    tensors = {
        "f32": torch.ones(3, 2), "f16": torch.ones(5, dtype=torch.float16), "bf16": torch.ones(2, 2).bfloat16(),
        "f64": torch.ones(1, dtype=torch.float64), "f8e4m3": torch.ones(4).to(torch.float8_e4m3fn),
        "f8e5m2": torch.ones(4).to(torch.float8_e5m2), "i8": torch.ones(3, dtype=torch.int8),
        "u8": torch.ones(7, dtype=torch.uint8), "i16": torch.ones(2, dtype=torch.int16),
        "i32": torch.ones(2, dtype=torch.int32), "i64": torch.arange(6).reshape(2, 3),
        "u16": torch.ones(2, dtype=torch.uint16), "u32": torch.ones(2, dtype=torch.uint32),
        "u64": torch.ones(2, dtype=torch.uint64), "bool": torch.ones(9, dtype=torch.bool),
        "scalar": torch.tensor(1.5), "empty": torch.ones(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")

    got = open_checkpoint(tmp_path).by_name

    expected = {"f32": "F32", "f16": "F16", "bf16": "BF16", "f64": "F64", "f8e4m3": "F8_E4M3", "f8e5m2": "F8_E5M2",
                "i8": "I8", "u8": "U8", "i16": "I16", "i32": "I32", "i64": "I64", "u16": "U16", "u32": "U32",
                "u64": "U64", "bool": "BOOL", "scalar": "F32", "empty": "F32"}
    assert {n: got[n].dtype for n in tensors} == expected
    assert {n: got[n].shape for n in tensors} == {n: tuple(t.shape) for n, t in tensors.items()}
    assert {n: got[n].nbytes for n in tensors} == {n: t.numel() * t.element_size() for n, t in tensors.items()}


def test_safetensors_wins_over_bin(tmp_path: Path, tiny_llama: Path, tiny_llama_bin: Path) -> None:
    both = tmp_path / "both"
    shutil.copytree(tiny_llama, both)
    shutil.copy(tiny_llama_bin / "pytorch_model.bin", both)

    assert open_checkpoint(both).format == "safetensors"


def test_plain_pth_state_dict(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2, 3, dtype=torch.float16)}}, tmp_path / "weights.pth")

    ckpt = open_checkpoint(tmp_path)

    assert ckpt.format == "torch"
    assert [(t.name, t.dtype, t.shape) for t in ckpt.tensors] == [("w", "F16", (2, 3))]


def test_bin_without_torch_says_how_to_install(tiny_llama_bin: Path) -> None:
    sys.modules["torch_hidden"] = sys.modules.pop("torch")
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail in this process
    try:
        with pytest.raises(MissingDependency) as err:
            open_checkpoint(tiny_llama_bin)
    finally:
        sys.modules["torch"] = sys.modules.pop("torch_hidden")
    assert str(err.value) == (f"reading '{tiny_llama_bin / 'pytorch_model.bin'}' needs torch: install it with  "
                              "pip install 'williw[torch]'")


# --- corruption: one message per kind -------------------------------------------------------------------------


def _write(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _error(path: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    return str(err.value)


def test_missing_folder(tmp_path: Path) -> None:
    assert _error(tmp_path / "nope") == f"'{tmp_path / 'nope'}': no such file or folder"


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert _error(tmp_path) == (f"'{tmp_path}': no weights found (expected model.safetensors, a safetensors index, "
                                "pytorch_model.bin or a .pth/.pt state dict)")


def test_truncated_length_prefix(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    assert _error(tmp_path) == (f"Failed to parse safetensors header for '{tmp_path / 'model.safetensors'}': the file "
                                "has 2 bytes, fewer than the 8-byte header length")


def test_header_length_past_end(tmp_path: Path) -> None:
    f = _write(tmp_path / "model.safetensors", {}, length=1000)
    assert _error(tmp_path) == (f"Failed to parse safetensors header for '{f}': header length 1,000 runs past the "
                                "end of the file (10 bytes); the file is truncated")


def test_absurd_header_length(tmp_path: Path) -> None:
    f = _write(tmp_path / "model.safetensors", {}, length=2**40)
    assert _error(tmp_path) == (f"Failed to parse safetensors header for '{f}': header length 1,099,511,627,776 "
                                "exceeds the 100,000,000-byte limit (not a safetensors file, or corrupt)")


def test_bad_json(tmp_path: Path) -> None:
    f = _write(tmp_path / "model.safetensors", b"{not json")
    assert _error(tmp_path).startswith(f"Failed to parse safetensors header for '{f}': the header is not valid JSON (")


def test_offsets_past_end_of_file(tmp_path: Path) -> None:
    f = _write(tmp_path / "model.safetensors",
               {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, data=b"\0" * 8)
    size = f.stat().st_size
    assert _error(tmp_path) == (f"Failed to parse safetensors header for '{f}': offsets of 'w' end at {size + 8:,} "
                                f"but the file has {size:,} bytes; the file is truncated")


def test_overlapping_offsets(tmp_path: Path) -> None:
    f = _write(tmp_path / "model.safetensors",
               {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, data=b"\0" * 12)
    assert _error(tmp_path) == (f"Failed to parse safetensors header for '{f}': offsets of 'b' start at 4, "
                                "overlapping the previous tensor which ends at 8")


def test_shape_disagrees_with_offsets(tmp_path: Path) -> None:
    f = _write(tmp_path / "model.safetensors",
               {"a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 8]}}, data=b"\0" * 8)
    assert _error(tmp_path) == (f"Failed to parse safetensors header for '{f}': tensor 'a' has 8 bytes in "
                                "data_offsets but shape [3] of BF16 needs 6")


def test_unknown_dtype(tmp_path: Path) -> None:
    f = _write(tmp_path / "model.safetensors", {"a": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}},
               data=b"\0\0")
    assert _error(tmp_path) == f"Failed to parse safetensors header for '{f}': tensor 'a' has unknown dtype 'F12'"


def test_index_naming_a_missing_shard(tmp_path: Path, tiny_llama_sharded: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_sharded, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    (broken / shard).unlink()

    message = _error(broken)

    assert message.startswith(f"'{broken / 'model.safetensors.index.json'}': tensor '")
    assert message.endswith(f"' is in shard '{shard}', which is missing")


def test_index_with_path_outside_the_folder(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../secret.safetensors"}}))
    assert _error(tmp_path) == (f"'{tmp_path / 'model.safetensors.index.json'}': tensor 'w' maps to "
                                "'../secret.safetensors', expected a file name in the folder")


def test_cli_reports_one_line_and_exit_2(williw, tmp_path: Path) -> None:
    _write(tmp_path / "model.safetensors", b"[1, 2]")

    proc = williw("metadata", str(tmp_path))

    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (f"error: Failed to parse safetensors header for '{tmp_path / 'model.safetensors'}': "
                           "the header is a JSON list, expected an object\n")
