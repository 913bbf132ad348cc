"""The model's structure: every stack in execution order and checked against config.json, one set of checkpoint
files, and compute from what a tensor is. Each case is a tiny model transformers builds, or crafted safetensors
where transformers has no class to build it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from williw.checkpoint import checkpoint_files, open_checkpoint  # noqa: E402
from williw.errors import CheckpointError  # noqa: E402
from williw.fleet import Node  # noqa: E402
from williw.hub import choose_files  # noqa: E402
from williw.metadata import generate_metadata, load_metadata, save_metadata  # noqa: E402
from williw.planner import make_plan  # noqa: E402
from williw.planner.costs import pipeline_model  # noqa: E402
from williw.planner.validate import validate_split_plan  # noqa: E402
from williw.splitter import split_all  # noqa: E402

B, S = 2, 8
T = B * S


def save(model, path: Path) -> Path:
    torch.manual_seed(0)
    model.save_pretrained(path)
    return path


def craft(path: Path, config: dict, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> Path:
    """A folder with config.json and one model.safetensors of zero tensors of these shapes and dtypes."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({n: torch.zeros(shape, dtype=dtype) for n, (shape, dtype) in shapes.items()}, path / "model.safetensors")
    return path


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vision = dict(depth=6, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    cfg = transformers.Qwen2VLConfig(vision_config=vision, text_config=text)
    return save(transformers.Qwen2VLForConditionalGeneration(cfg), tmp_path_factory.mktemp("vl") / "qwen2-vl")


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=6, num_decoder_layers=2, num_heads=4,
                                vocab_size=128)
    return save(transformers.T5ForConditionalGeneration(cfg), tmp_path_factory.mktemp("t5") / "t5")


def test_vision_language_stacks_in_execution_order(qwen2_vl: Path) -> None:
    meta = generate_metadata(qwen2_vl, batch_size=B, sequence_length=S)

    assert [(s["part"], s["prefix"], s["layers"], s["config_key"], s["start"]) for s in meta.stacks] == [
        ("vision", "visual.blocks", 6, "vision_config.depth", 0),
        ("language", "model.layers", 4, "text_config.num_hidden_layers", 6)]
    assert [(b.index, b.stack, b.stack_index) for b in meta.blocks] == \
        [(i, "vision", i) for i in range(6)] + [(6 + j, "language", j) for j in range(4)]
    by_name = {x.name: x for x in meta.layers}
    assert (by_name["visual.patch_embed.proj.weight"].placement, by_name["model.embed_tokens.weight"].placement) \
        == ("first", "first")
    merger = by_name["visual.merger.mlp.0.weight"]
    assert (merger.role, merger.placement, merger.block, merger.stack) == ("between", "block", 5, "vision")
    assert by_name["model.layers.3.mlp.up_proj.weight"].block == 9
    assert (by_name["model.norm.weight"].placement, by_name["lm_head.weight"].placement) == ("last", "last")
    # Vision attention is as wide as the tower (embed_dim 32), the language model's as the model (64).
    assert meta.blocks[0].attention_compute == 4 * B * S * S * 32 / 1e9
    assert meta.blocks[6].attention_compute == 4 * B * S * S * 64 / 1e9


def test_llava_projector_runs_between_the_stacks(tmp_path: Path) -> None:
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                           num_attention_heads=4, image_size=28, patch_size=14)
    text = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = save(transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(vision_config=vision,
                                                                                     text_config=text)),
                 tmp_path / "llava")

    meta = generate_metadata(model)
    # transformers < 5.x saves CLIP's tower as vision_tower.vision_model.*, later releases as vision_tower.*
    tower = next(p for p in ("vision_tower.vision_model", "vision_tower")
                 if any(x.name.startswith(p + ".") for x in meta.layers))

    assert [(s["part"], s["prefix"], s["layers"], s["start"]) for s in meta.stacks] == [
        ("vision", f"{tower}.encoder.layers", 5, 0), ("language", "language_model.model.layers", 3, 5)]
    roles = {x.name.replace(tower + ".", "vision_tower."): (x.role, x.block) for x in meta.layers
             if x.role != "block"}
    assert roles == {
        "vision_tower.embeddings.class_embedding": ("first", None),
        "vision_tower.embeddings.patch_embedding.weight": ("first", None),
        "vision_tower.embeddings.position_embedding.weight": ("first", None),
        "vision_tower.pre_layrnorm.weight": ("first", None), "vision_tower.pre_layrnorm.bias": ("first", None),
        "language_model.model.embed_tokens.weight": ("first", None),
        **{f"multi_modal_projector.linear_{i}.{p}": ("between", 4) for i in (1, 2) for p in ("weight", "bias")},
        "vision_tower.post_layernorm.weight": ("between", 4), "vision_tower.post_layernorm.bias": ("between", 4),
        "language_model.model.norm.weight": ("last", None), "language_model.lm_head.weight": ("last", None)}


def test_tight_memory_puts_the_vision_tower_first(qwen2_vl: Path, tmp_path: Path) -> None:
    meta = generate_metadata(qwen2_vl)
    model = pipeline_model(meta)  # a third of the weights and KV cache, with room to spare, and one transient
    transient = max(*model.block_act, model.last_act)
    fits = ((model.stage_memory(0, model.n) - transient) / 3 * 1.3 + transient) / 1e9
    nodes = [Node(node_id=f"n{i}", compute_tflops=1.0, memory_gb=fits) for i in range(3)]

    plan = make_plan(meta, nodes)

    stage_of = {n: i for i, a in enumerate(plan.assignments) for n in a.layer_names}
    assert len(plan.assignments) == 3
    assert stage_of["visual.blocks.0.attn.qkv.weight"] == 0
    assert stage_of["visual.blocks.5.attn.qkv.weight"] <= stage_of["model.layers.0.self_attn.q_proj.weight"]
    assert stage_of["model.layers.3.mlp.up_proj.weight"] == stage_of["lm_head.weight"] == 2
    assert [a.blocks for a in plan.assignments] == sorted(a.blocks for a in plan.assignments)  # type: ignore
    assert plan.assignments[0].blocks[0] == 0 and plan.assignments[-1].blocks[1] == 10  # type: ignore
    assert validate_split_plan([x.name for x in meta.layers], plan, metadata=meta, nodes=nodes) == []
    split_all(qwen2_vl, plan, tmp_path / "shards")
    held = [n for a in plan.assignments for n in load_file(tmp_path / "shards" / a.node_id / "model.safetensors")]
    assert sorted(held) == sorted(x.name for x in meta.layers)


def test_encoder_decoder_stacks_and_cross_attention(t5: Path) -> None:
    meta = generate_metadata(t5, batch_size=B, sequence_length=S)

    assert [(s["part"], s["prefix"], s["layers"], s["config_key"], s["start"]) for s in meta.stacks] == [
        ("encoder", "encoder.block", 6, "num_layers", 0), ("decoder", "decoder.block", 2, "num_decoder_layers", 6)]
    core = 4 * B * S * S * 32
    # Decoder blocks attend to themselves and to the encoder's output: two cores each.
    assert [b.attention_compute for b in meta.blocks] == [core / 1e9] * 6 + [2 * core / 1e9] * 2
    by_name = {x.name: x for x in meta.layers}
    assert by_name["decoder.block.1.layer.2.DenseReluDense.wi.weight"].layer_type == "mlp"
    assert by_name["decoder.block.1.layer.2.DenseReluDense.wi.weight"].block == 7
    final = by_name["encoder.final_layer_norm.weight"]
    assert (final.role, final.block) == ("between", 5)
    assert by_name["decoder.final_layer_norm.weight"].placement == "last"
    assert by_name["shared.weight"].placement == "first"


def _mtp_model(path: Path, **config) -> Path:
    f32 = torch.float32
    shapes = {"model.embed_tokens.weight": ((16, 8), f32), "model.norm.weight": ((8,), f32),
              "lm_head.weight": ((16, 8), f32)}
    shapes.update({f"model.layers.{i}.mlp.up_proj.weight": ((8, 8), f32) for i in range(4)})
    return craft(path, {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                        "hidden_size": 8, "vocab_size": 16, "num_hidden_layers": 3, **config}, shapes)


def test_multi_token_prediction_layer_is_not_a_block(tmp_path: Path) -> None:
    meta = generate_metadata(_mtp_model(tmp_path / "m", num_nextn_predict_layers=1))

    assert [b.index for b in meta.blocks] == [0, 1, 2]
    mtp = {x.name: x for x in meta.layers}["model.layers.3.mlp.up_proj.weight"]
    assert (mtp.role, mtp.placement, mtp.block, mtp.stack_index) == ("mtp", "last", None, 3)


def test_unexplained_extra_block_is_one_line_exit_2(tmp_path: Path, williw) -> None:
    model = _mtp_model(tmp_path / "m")

    proc = williw("metadata", str(model), "-o", str(tmp_path / "meta.json"))

    assert proc.returncode == 2
    assert proc.stderr == (f"error: '{model / 'config.json'}': num_hidden_layers = 3 but the checkpoint's "
                           "'model.layers' has 4 blocks (0..3); the language stack does not match its config\n")
    assert not (tmp_path / "meta.json").exists()


def test_mistral_consolidated_copy_is_ignored(tmp_path: Path, tiny_llama: Path) -> None:
    model = Path(shutil.copytree(tiny_llama, tmp_path / "m"))
    shutil.copy(model / "model.safetensors", model / "consolidated.safetensors")

    meta = generate_metadata(model)

    assert checkpoint_files(model) == ([model / "model.safetensors"], [model / "consolidated.safetensors"])
    assert meta.total_bytes == generate_metadata(tiny_llama).total_bytes
    assert meta.ignored_files == ("consolidated.safetensors",)
    assert choose_files(["config.json", "model.safetensors", "consolidated.safetensors", "params.json"]) == \
        ["config.json", "model.safetensors"]


def stray_copy(tmp_path: Path, tiny_llama_sharded: Path) -> Path:
    model = Path(shutil.copytree(tiny_llama_sharded, tmp_path / "m"))
    state = {}
    for f in sorted(model.glob("*.safetensors")):
        state.update(load_file(f))
    save_file({n: t.to(torch.bfloat16) for n, t in state.items()}, model / "model.safetensors")
    return model


def test_index_wins_over_a_stray_copy_in_another_dtype(tmp_path: Path, tiny_llama_sharded: Path) -> None:
    model = stray_copy(tmp_path, tiny_llama_sharded)
    shards = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"].values()

    ckpt = open_checkpoint(model)

    assert ckpt.files == tuple(dict.fromkeys(shards))
    assert ckpt.ignored == ("model.safetensors",)
    assert generate_metadata(model).total_bytes == generate_metadata(tiny_llama_sharded).total_bytes


def test_second_copy_without_index_is_left_out(tmp_path: Path, tiny_llama: Path) -> None:
    model = Path(shutil.copytree(tiny_llama, tmp_path / "m"))
    (model / "model.safetensors").rename(model / "weights.safetensors")
    save_file({n: t.to(torch.bfloat16) for n, t in load_file(model / "weights.safetensors").items()},
              model / "weights.bf16.safetensors")

    assert checkpoint_files(model) == ([model / "weights.bf16.safetensors"], [model / "weights.safetensors"])


@pytest.mark.parametrize("case", ["consolidated", "stray"])
def test_verify_passes_on_duplicate_copy_folders(case: str, tmp_path: Path, tiny_llama: Path,
                                                 tiny_llama_sharded: Path, williw) -> None:
    if case == "consolidated":
        model = Path(shutil.copytree(tiny_llama, tmp_path / "m"))
        shutil.copy(model / "model.safetensors", model / "consolidated.safetensors")
    else:
        model = stray_copy(tmp_path, tiny_llama_sharded)
    williw("metadata", str(model), "-o", str(tmp_path / "meta.json"), check=True)
    nodes = [{"node_id": "a", "compute_tflops": 1, "memory_gb": 1}, {"node_id": "b", "compute_tflops": 1,
                                                                      "memory_gb": 1}]
    (tmp_path / "nodes.json").write_text(json.dumps(nodes))
    williw("plan", str(tmp_path / "meta.json"), "--nodes", str(tmp_path / "nodes.json"), "-o",
           str(tmp_path / "plan.json"), check=True)
    williw("split", str(model), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "shards"), "--all",
           check=True)

    proc = williw("verify", str(model), "--plan", str(tmp_path / "plan.json"), "--shards", str(tmp_path / "shards"))

    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_gptq_priced_at_logical_shape(tmp_path: Path) -> None:
    # One 4-bit GPTQ linear 64 -> 32, group size 16: qweight int32 [64*4/32, 32], qzeros int32 [64/16, 32*4/32],
    # scales fp16 [64/16, 32], g_idx int32 [64]; plus an fp16 embedding 128 x 64.
    i32, f16 = torch.int32, torch.float16
    prefix = "model.layers.0.self_attn.q_proj"
    model = craft(tmp_path / "m", {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                                   "vocab_size": 128, "num_hidden_layers": 1, "tie_word_embeddings": False,
                                   "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 16}},
                  {f"{prefix}.qweight": ((8, 32), i32), f"{prefix}.qzeros": ((4, 4), i32),
                   f"{prefix}.scales": ((4, 32), f16), f"{prefix}.g_idx": ((64,), i32),
                   "model.embed_tokens.weight": ((128, 64), f16)})

    meta = generate_metadata(model, batch_size=B, sequence_length=S)

    logical = 64 * 32
    assert meta.total_params == logical + 128 * 64
    assert meta.total_bytes == 8 * 32 * 4 + 4 * 4 * 4 + 4 * 32 * 2 + 64 * 4 + 128 * 64 * 2
    core = 4 * B * S * S * 64
    assert meta.total_compute == (2 * T * logical + core) / 1e9
    notes = {x.name.rsplit(".", 1)[1]: x.note for x in meta.layers if x.name.startswith(prefix)}
    assert notes == {"qweight": "quantized", "qzeros": "quant_state", "scales": "quant_state", "g_idx": "quant_state"}


def test_gpt2_stored_causal_masks_are_buffers(tmp_path: Path, tiny_gpt2: Path) -> None:
    model = Path(shutil.copytree(tiny_gpt2, tmp_path / "m"))
    # The original GPT-2 layout: no "transformer." prefix, no stored head, a float causal mask in every block.
    state = {n.removeprefix("transformer."): t for n, t in load_file(model / "model.safetensors").items()
             if not n.startswith("lm_head")}
    state.update({f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 256, 256)) for i in range(4)})
    save_file(state, model / "model.safetensors")

    original, transformers_layout = generate_metadata(model), generate_metadata(tiny_gpt2)

    assert original.total_params == transformers_layout.total_params
    assert original.total_compute == transformers_layout.total_compute
    assert original.total_bytes == transformers_layout.total_bytes + 4 * 256 * 256 * 4
    assert [(b.index, b.tensors) for b in original.blocks] == [(i, 13) for i in range(4)]
    assert {x.note for x in original.layers if x.name.endswith(".attn.bias")} == {"buffer"}
    assert {x.name: x.placement for x in original.layers if x.block is None} == {
        "wte.weight": "first", "wpe.weight": "first", "ln_f.weight": "last", "ln_f.bias": "last"}


def test_mamba_blocks_have_a_scan_not_an_attention_core(tmp_path: Path) -> None:
    cfg = transformers.MambaConfig(hidden_size=32, num_hidden_layers=3, vocab_size=128, state_size=8, expand=2)
    model = save(transformers.MambaForCausalLM(cfg), tmp_path / "mamba")
    d_inner, d_state, rank, conv = 64, 8, 2, 4  # expand * hidden; time_step_rank = ceil(32 / 16)

    meta = generate_metadata(model, batch_size=B, sequence_length=S)

    matmuls = 32 * 2 * d_inner + d_inner * (rank + 2 * d_state) + rank * d_inner + d_inner * 32 + d_inner * conv
    vectors = d_inner + d_inner + d_inner  # conv1d.bias, dt_proj.bias, D: one op per element
    block = 2 * T * matmuls + T * vectors + 4 * T * 32 + 9 * T * d_inner * d_state
    assert [b.attention_compute for b in meta.blocks] == [0.0] * 3
    assert [b.state_space_compute for b in meta.blocks] == [9 * T * d_inner * d_state / 1e9] * 3
    assert [b.compute for b in meta.blocks] == [block / 1e9] * 3
    assert {x.layer_type for x in meta.layers if ".mixer." in x.name} == {"ssm"}


def test_experts_priced_at_the_active_fraction(tmp_path: Path) -> None:
    f32 = torch.float32
    shapes = {"model.layers.0.mlp.gate.weight": ((8, 16), f32),
              "model.layers.0.mlp.shared_experts.up_proj.weight": ((32, 16), f32)}
    shapes.update({f"model.layers.0.mlp.experts.{e}.up_proj.weight": ((32, 16), f32) for e in range(8)})
    model = craft(tmp_path / "m", {"model_type": "deepseek_v3", "hidden_size": 16, "num_hidden_layers": 1,
                                   "n_routed_experts": 8, "num_experts_per_tok": 2}, shapes)

    meta = generate_metadata(model, batch_size=B, sequence_length=S)

    assert meta.total_params == 8 * 16 + 32 * 16 + 8 * 32 * 16
    assert meta.total_compute == 2 * T * (8 * 16 + 32 * 16 + 2 * 32 * 16) / 1e9  # router, shared, 2 of 8


def test_sentence_transformers_folder_names_its_model(tmp_path: Path, tiny_bert: Path, williw) -> None:
    folder = tmp_path / "st"
    shutil.copytree(tiny_bert, folder / "0_Transformer")
    (folder / "modules.json").write_text("[]")

    with pytest.raises(CheckpointError) as err:
        open_checkpoint(folder)

    assert str(err.value) == (f"'{folder}': no weights at the top level (a sentence-transformers folder); the model "
                              f"is in the subfolder '0_Transformer': use '{folder / '0_Transformer'}' as the model "
                              "folder")


def test_metadata_json_keeps_stacks(tmp_path: Path, t5: Path) -> None:
    meta = generate_metadata(t5)
    save_metadata(meta, tmp_path / "meta.json")

    assert load_metadata(tmp_path / "meta.json") == meta


def _typed_model(path: Path, layer_types: list[str]) -> Path:
    f32 = torch.float32
    shapes = {f"model.layers.{i}.self_attn.q_proj.weight": ((16, 16), f32) for i in range(3)}
    return craft(path, {"model_type": "qwen3_next", "hidden_size": 16, "num_hidden_layers": 3, "sliding_window": 4,
                        "layer_types": layer_types}, shapes)


def test_layer_types_set_each_attention_core(tmp_path: Path) -> None:
    model = _typed_model(tmp_path / "m", ["full_attention", "sliding_attention", "linear_attention"])

    meta = generate_metadata(model, batch_size=B, sequence_length=S)

    # Each query sees S keys, at most the window's 4, or none (linear attention has no softmax core).
    assert [b.attention_compute for b in meta.blocks] == [4 * B * S * S * 16 / 1e9, 4 * B * S * 4 * 16 / 1e9, 0.0]


def test_layer_types_of_the_wrong_length(tmp_path: Path) -> None:
    model = _typed_model(tmp_path / "m", ["full_attention"] * 2)

    with pytest.raises(CheckpointError) as err:
        generate_metadata(model)

    assert str(err.value) == f"'{model / 'config.json'}': layer_types has 2 entries but num_hidden_layers = 3"


F8 = torch.float8_e4m3fn
QUANTIZED = {  # one 16 -> 32 linear (512 logical weights) as each method stores it; stored bytes written out
    "fp8": ({"quant_method": "fp8", "weight_block_size": [128, 128]},
            {"weight": ((32, 16), F8), "weight_scale_inv": ((1, 1), torch.float32)}, 512 + 4),
    "bnb-4bit": ({"quant_method": "bitsandbytes", "load_in_4bit": True},
                 {"weight": ((256, 1), torch.uint8), "weight.absmax": ((8,), torch.float32),
                  "weight.quant_map": ((16,), torch.float32),
                  "weight.quant_state.bitsandbytes__nf4": ((100,), torch.uint8)}, 256 + 32 + 64 + 100),
    "bnb-8bit": ({"quant_method": "bitsandbytes", "load_in_8bit": True},
                 {"weight": ((32, 16), torch.int8), "SCB": ((32,), torch.float32)}, 512 + 128),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 8},
            {"qweight": ((16, 4), torch.int32), "qzeros": ((2, 4), torch.int32),
             "scales": ((2, 32), torch.float16)}, 256 + 32 + 128),
}


@pytest.mark.parametrize("method", QUANTIZED)
def test_quantized_linear_at_logical_shape(method: str, tmp_path: Path) -> None:
    quant, tensors, stored = QUANTIZED[method]
    prefix = "model.layers.0.mlp.up_proj"
    model = craft(tmp_path / "m", {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1,
                                   "quantization_config": quant},
                  {f"{prefix}.{n}": spec for n, spec in tensors.items()})

    meta = generate_metadata(model, batch_size=B, sequence_length=S)

    assert (meta.total_params, meta.total_bytes, meta.total_compute) == (512, stored, 2 * T * 512 / 1e9)


def test_a_stack_the_config_does_not_declare_is_named(tmp_path: Path) -> None:
    f32 = torch.float32
    shapes = {f"{stack}.{i}.attn.q.weight": ((4, 4), f32) for stack in ("model.layers", "audio_tower.layers")
              for i in range(2)}
    shapes.update({f"model.merger.mlp.{i}.weight": ((4, 4), f32) for i in range(3)})  # a Sequential: a module
    model = craft(tmp_path / "m", {"model_type": "llama", "hidden_size": 4, "num_hidden_layers": 2}, shapes)

    with pytest.raises(CheckpointError) as err:
        generate_metadata(model)

    assert str(err.value) == (f"'{model / 'config.json'}': the checkpoint's 'audio_tower.layers' holds 2 numbered "
                              "blocks but the config declares no stack for them (expected in vision_config, "
                              "text_config or encoder/decoder layer counts); williw cannot place them")


def test_bart_shared_embedding_is_the_tied_head_and_its_decoder_keeps_a_cache(tmp_path: Path) -> None:
    # BART (and Marian, mBART, Pegasus, M2M100) keep the token table at model.shared and name the decoder's heads
    # decoder_attention_heads: the table was priced as an "other" tensor of the last stage, the tied head was the
    # decoder's position table (258 rows), and the decoder blocks held no KV cache.
    cfg = transformers.BartConfig(vocab_size=128, d_model=32, encoder_layers=3, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64)
    model = save(transformers.BartForConditionalGeneration(cfg), tmp_path / "bart")

    meta = generate_metadata(model, batch_size=B, sequence_length=S)

    by_name = {x.name: x for x in meta.layers}
    shared = by_name["model.shared.weight"]
    assert (shared.layer_type, shared.placement) == ("embedding", "first")
    assert meta.tied_lm_head is not None and meta.tied_lm_head.tensor == "model.shared.weight"
    assert [b.kv_bytes_per_token for b in meta.blocks] == [0] * 3 + [2 * 4 * 8 * 4] * 2  # K and V, 4 heads of 8


def test_stacked_experts_are_priced_at_the_active_fraction(tmp_path: Path) -> None:
    # GraniteMoE and JetMoE store each layer's experts as one [experts, out, in] tensor whose name has no
    # "experts" in it; they were priced as if all 8 experts ran for every token.
    f32 = torch.float32
    shapes = {"model.layers.0.block_sparse_moe.router.layer.weight": ((8, 16), f32),
              "model.layers.0.block_sparse_moe.input_linear.weight": ((8, 64, 16), f32),
              "model.layers.0.block_sparse_moe.output_linear.weight": ((8, 16, 32), f32)}
    model = craft(tmp_path / "m", {"model_type": "granitemoe", "hidden_size": 16, "num_hidden_layers": 1,
                                   "num_local_experts": 8, "num_experts_per_tok": 2}, shapes)

    meta = generate_metadata(model, batch_size=B, sequence_length=S)

    assert meta.total_params == 8 * 16 + 8 * 64 * 16 + 8 * 16 * 32  # in full
    assert meta.total_compute == 2 * T * (8 * 16 + 2 * 64 * 16 + 2 * 16 * 32) / 1e9  # router, 2 of 8 experts
