"""Metadata: blocks, layer types, exact FLOPs, totals, JSON validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from williw import tinymodels
from williw.classify import block_of, find_block_prefix, layer_type
from williw.config import parse_config
from williw.errors import MetadataError
from williw.metadata import ModelMetadata, generate_metadata, load_metadata, save_metadata


def test_hand_computed_flops_exactly(tmp_path: Path) -> None:
    # hidden 64, intermediate 128, 4 heads, 2 KV heads (k/v are 32 x 64), vocab 128, 4 blocks, untied; B=2, S=8.
    model = tinymodels.build_causal_lm(tmp_path / "m", "llama")
    tokens = 2 * 8
    matmul_params = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64  # q k v o gate up down
    block = 2 * tokens * matmul_params + 4 * tokens * 2 * 64 + 4 * 2 * 8 * 8 * 64  # matmuls, 2 norms, QK^T and AV
    final_norm = 4 * tokens * 64
    lm_head = 2 * tokens * 128 * 64
    embedding = 0

    meta = generate_metadata(model, batch_size=2, sequence_length=8)

    assert meta.total_compute == (4 * block + final_norm + lm_head + embedding) / 1e9
    assert [b.compute for b in meta.blocks] == [block / 1e9] * 4
    assert [b.attention_compute for b in meta.blocks] == [4 * 2 * 8 * 8 * 64 / 1e9] * 4
    by_name = {x.name: x for x in meta.layers}
    assert by_name["model.embed_tokens.weight"].compute_required == 0
    assert by_name["model.layers.0.self_attn.k_proj.weight"].compute_required == 2 * tokens * 32 * 64 / 1e9
    assert by_name["model.norm.weight"].compute_required == final_norm / 1e9


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_sharded", "tiny_gpt2", "tiny_bert", "tiny_llama_bin"])
def test_totals_add_up(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    reference = tinymodels.load_reference_state(path)

    meta = generate_metadata(path)

    assert meta.total_layers == len(reference)
    assert meta.total_params == sum(t.numel() for t in reference.values())
    assert meta.total_bytes == sum(t.numel() * t.element_size() for t in reference.values())
    in_blocks = [x for x in meta.layers if x.block is not None]
    assert sum(b.params for b in meta.blocks) == sum(x.num_params for x in in_blocks)
    assert sum(b.bytes for b in meta.blocks) == sum(x.bytes for x in in_blocks)
    assert sum(b.tensors for b in meta.blocks) == len(in_blocks)
    tied = meta.tied_lm_head.compute_required if meta.tied_lm_head else 0
    assert meta.total_compute == pytest.approx(sum(x.compute_required for x in meta.layers)
                                               + sum(b.attention_compute for b in meta.blocks) + tied, rel=1e-12)


def test_layouts_of_three_families(tiny_llama: Path, tiny_gpt2: Path, tiny_bert: Path) -> None:
    llama, gpt2, bert = (generate_metadata(p) for p in (tiny_llama, tiny_gpt2, tiny_bert))

    assert [b.index for b in llama.blocks] == [0, 1, 2, 3]
    assert [b.index for b in gpt2.blocks] == [0, 1, 2, 3]
    assert [b.index for b in bert.blocks] == [0, 1, 2]
    assert [b.tensors for b in llama.blocks] == [9] * 4
    assert [b.tensors for b in gpt2.blocks] == [12] * 4  # ln_1, attn c_attn/c_proj, ln_2, mlp c_fc/c_proj (w + b)
    assert [b.tensors for b in bert.blocks] == [16] * 3

    def placements(meta: ModelMetadata) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"first": [], "last": []}
        for x in meta.layers:
            if x.block is None:
                out[x.placement].append(x.name)
        return out

    assert placements(llama) == {"first": ["model.embed_tokens.weight"],
                                 "last": ["lm_head.weight", "model.norm.weight"]}
    assert placements(gpt2) == {"first": ["transformer.wpe.weight", "transformer.wte.weight"],
                                "last": ["transformer.ln_f.bias", "transformer.ln_f.weight"]}
    assert placements(bert)["last"] == ["pooler.dense.bias", "pooler.dense.weight"]
    assert "embeddings.LayerNorm.weight" in placements(bert)["first"]
    assert llama.tied_lm_head is None
    assert gpt2.tied_lm_head is not None and gpt2.tied_lm_head.tensor == "transformer.wte.weight"
    assert bert.tied_lm_head is None  # BertModel has no LM head
    assert llama.layers[0].name == "model.embed_tokens.weight" and llama.layers[-1].name == "model.norm.weight"


@pytest.mark.parametrize(("name", "kind"), [
    ("model.embed_tokens.weight", "embedding"), ("transformer.wte.weight", "embedding"),
    ("embeddings.position_ids", "embedding"), ("model.layers.3.self_attn.q_proj.weight", "attention"),
    ("transformer.h.0.attn.c_attn.weight", "attention"), ("encoder.layer.1.attention.self.query.bias", "attention"),
    ("encoder.layer.1.attention.output.LayerNorm.weight", "norm"), ("model.layers.0.mlp.down_proj.weight", "mlp"),
    ("transformer.h.0.mlp.c_fc.weight", "mlp"), ("encoder.layer.0.intermediate.dense.weight", "mlp"),
    ("encoder.layer.0.output.dense.weight", "mlp"), ("model.norm.weight", "norm"), ("transformer.ln_f.bias", "norm"),
    ("lm_head.weight", "lm_head"), ("embed_out.weight", "lm_head"), ("pooler.dense.weight", "other"),
    ("model.layers.2.mlp.shared_expert.up_proj.weight", "mlp"), ("shared.weight", "embedding"),
])
def test_layer_types(name: str, kind: str) -> None:
    assert layer_type(name) == kind


@pytest.mark.parametrize(("names", "prefix"), [
    (["model.layers.0.a.weight", "model.layers.1.a.weight", "model.norm.weight"], "model.layers"),
    (["h.0.attn.weight", "h.1.attn.weight", "wte.weight"], "h"),
    (["gpt_neox.layers.0.x.weight", "gpt_neox.layers.1.x.weight"], "gpt_neox.layers"),
    (["model.decoder.layers.0.fc1.weight", "model.decoder.layers.1.fc1.weight"], "model.decoder.layers"),
    # 8 experts per block outnumber the 2 blocks, but only the leftmost index counts.
    ([f"model.layers.{b}.mlp.experts.{e}.w1.weight" for b in range(2) for e in range(8)], "model.layers"),
    (["lm_head.weight"], None),
])
def test_block_prefix_is_generic(names: list[str], prefix: str | None) -> None:
    assert find_block_prefix(names) == prefix
    if prefix:
        assert block_of(names[1], prefix) == (0 if "experts" in names[1] else 1)


def test_config_in_old_and_new_spellings() -> None:
    old = parse_config({"n_layer": 12, "n_embd": 768, "n_head": 12, "torch_dtype": "float16",
                        "architectures": ["GPT2LMHeadModel"]})
    new = parse_config({"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "dtype": "float16",
                        "architectures": ["GPT2LMHeadModel"]})
    nested = parse_config({"architectures": ["X"], "text_config": {"num_hidden_layers": 12, "hidden_size": 768,
                                                                   "num_attention_heads": 12, "dtype": "float16"}})

    for cfg in (old, new, nested):
        assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.dtype) == (12, 768, 12, "float16")
    assert old.tie_word_embeddings and parse_config({"tie_word_embeddings": False}).tie_word_embeddings is False


def test_json_round_trip(tmp_path: Path, tiny_llama_tied_bf16: Path) -> None:
    meta = generate_metadata(tiny_llama_tied_bf16, model_name="org/tiny", batch_size=2, sequence_length=16)
    save_metadata(meta, tmp_path / "m.json")

    loaded = load_metadata(tmp_path / "m.json")

    assert loaded == meta
    assert json.loads((tmp_path / "m.json").read_text())["layers"][0]["dtype"] == "BF16"


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("model_name"), "missing field 'model_name'"),
    (lambda d: d.update(batch_size=0), "field 'batch_size' expected an integer >= 1, got 0"),
    (lambda d: d["layers"][2].update(bytes=-5), "field 'layers[2].bytes' expected an integer >= 0, got -5"),
    (lambda d: d["layers"][0].update(dtype="F12"), "field 'layers[0].dtype' expected a safetensors dtype ("),
    (lambda d: d["layers"][1].update(layer_type="conv"),
     "field 'layers[1].layer_type' expected one of embedding, attention, mlp, norm, lm_head, ssm, other, got 'conv'"),
    (lambda d: d.update(layers={}), "field 'layers' expected a list, got {}"),
    (lambda d: d.update(format_version=9), "format_version 9 is newer than this williw reads (1); upgrade williw"),
])
def test_invalid_metadata_names_the_field(tmp_path: Path, tiny_llama: Path, edit, message: str) -> None:
    data = generate_metadata(tiny_llama).to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))

    with pytest.raises(MetadataError) as err:
        load_metadata(path)

    assert str(err.value).startswith(f"'{path}': {message}")


def test_cli_writes_json_and_prints_summary(williw, tmp_path: Path, tiny_llama: Path) -> None:
    out = tmp_path / "meta.json"

    proc = williw("metadata", str(tiny_llama), "-o", str(out), "--batch-size", "2", "--sequence-length", "8",
                  "--json", check=True)

    summary = json.loads(proc.stdout)
    meta = load_metadata(out)
    assert summary["tensors"] == meta.total_layers == 39
    assert summary["total_compute_gflops"] == meta.total_compute
    assert list(tmp_path.iterdir()) == [out]  # no temporary left behind


def test_metadata_path_never_imports_torch(tiny_llama: Path, tmp_path: Path) -> None:
    code = ("import sys; from williw.cli import cli; "
            f"cli.main(['metadata', {str(tiny_llama)!r}, '-o', {str(tmp_path / 'm.json')!r}], standalone_mode=False); "
            "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'sqlalchemy', 'huggingface_hub', 'numpy') "
            "if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"
