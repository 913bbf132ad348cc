"""Generation over the placed model, family by family, through real processes: a worker and two node agents on
loopback. For every decoder family in `FAMILIES` (tiny models transformers builds from a config, with weights
drawn wide enough that greedy decoding does not repeat one token), 16 greedy tokens through the two stages equal
``model.generate`` of the whole model; every family in `REFUSED` is refused in one line naming its architecture.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fleetproc import byte_tokenizer  # noqa: E402
from williw.client import WorkerClient  # noqa: E402
from williw.decode_rules import decode_rules  # noqa: E402
from williw.errors import GenerateError  # noqa: E402
from williw.metadata import generate_metadata  # noqa: E402
from williw.pipeline import Pipeline, generate_tokens  # noqa: E402
from williw.planner.plan import Plan  # noqa: E402
from williw.progress import quiet_transformers  # noqa: E402
from williw.serve import ModelServer  # noqa: E402
from workerproc import VENV_BIN, WorkerProcess, stop_processes  # noqa: E402
from workerproc import wait_for as _wait  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
            "long_factor": [3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0, 17.0], "original_max_position_embeddings": 16}
# model_type -> config overrides: each family's own features (sliding windows shorter than the prompt, layer kinds,
# experts, latent attention, state-space layers) at a size that builds in milliseconds.
FAMILIES: dict[str, dict] = {
    "llama": {}, "mistral": {"sliding_window": 8}, "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 16},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    # Gemma 2 and 3 untied: with a tied head (and the sqrt(hidden) embedding scale) every weight tried repeats one
    # token; gemma and qwen2 cover the tied head.
    "gemma": {"head_dim": 16}, "gemma2": {"head_dim": 16, "sliding_window": 8, "tie_word_embeddings": False},
    "gemma3_text": {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2,
                    "tie_word_embeddings": False},
    "phi": {"pad_token_id": 0},
    # long-rope scaling: the 10-token prompt and 16 new tokens pass original_max_position_embeddings = 16
    "phi3": {"pad_token_id": 0, "original_max_position_embeddings": 16, "max_position_embeddings": 64,
             "rope_parameters": LONGROPE},
    "gpt_neox": {}, "falcon": {"num_kv_heads": 2, "new_decoder_architecture": True},
    "gpt2": {"n_embd": 64, "n_layer": 4, "n_head": 4}, "gpt_bigcode": {"n_embd": 64, "n_layer": 4, "n_head": 4},
    "gptj": {"n_embd": 64, "n_layer": 4, "n_head": 4, "rotary_dim": 8},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64}, "bloom": {"n_layer": 4, "n_head": 4},
    "olmo": {}, "olmo2": {}, "olmo3": {"sliding_window": 8}, "stablelm": {}, "starcoder2": {}, "granite": {},
    "cohere": {}, "nemotron": {"head_dim": 16}, "exaone4": {"sliding_window": 8},
    "codegen": {"n_embd": 64, "n_layer": 4, "n_head": 4, "rotary_dim": 8},
    "xglm": {"d_model": 64, "num_layers": 4, "ffn_dim": 128}, "biogpt": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16, "n_group": 1, "topk_group": 1},
    "llama4_text": {"head_dim": 16, "num_local_experts": 2, "intermediate_size_mlp": 128,
                    "interleave_moe_layer_step": 2, "attention_chunk_size": 8},
    "jamba": {"num_experts": 4, "num_experts_per_tok": 2, "attn_layer_period": 2, "attn_layer_offset": 1,
              "expert_layer_period": 2, "expert_layer_offset": 1, "mamba_d_state": 8, "mamba_dt_rank": 8,
              "use_mamba_kernels": False},
    "mamba": {"state_size": 8},
    "mamba2": {"num_heads": 8, "head_dim": 16, "state_size": 8, "n_groups": 1, "chunk_size": 16, "expand": 2},
    # mup_vector: a buffer the parent model's initialisation fills
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8,
                  "mamba_chunk_size": 16, "head_dim": 16},
    "recurrent_gemma": {"lru_width": 64, "attention_window_size": 8, "head_dim": 16,
                        "block_types": ["recurrent", "attention"]},
    # one attention layer among state-space ones: a stage without it answers the cache length from its session
    "bamba": {"mamba_d_state": 8, "mamba_d_head": 16, "mamba_n_heads": 8, "attn_layer_indices": [1],
              "mamba_chunk_size": 16, "mamba_expand": 2},
    "ministral": {"sliding_window": 8, "head_dim": 16},
    "dbrx": {"d_model": 64, "n_layers": 4, "n_heads": 4,
             "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    # Ties and non-block modules from the model's definition: a tied GPT-BigCode whose vocabulary equals its
    # positions (the position table has the token table's shape), a tied checkpoint that also stores lm_head.weight,
    # and opt-350m's layout (project_in runs before block 0).
    "gpt_bigcode vocab=positions": {"_model_type": "gpt_bigcode", "n_embd": 64, "n_layer": 4, "n_head": 4,
                                    "n_positions": 128, "tie_word_embeddings": True},
    "llama tied, lm_head stored": {"_model_type": "llama", "tie_word_embeddings": True, "_store_head": True},
    "opt-350m layout": {"_model_type": "opt", "ffn_dim": 128, "word_embed_proj_dim": 32},
    # per-head norm lists inside each block, as many as the blocks: not a second block stack
    "stablelm qk_layernorm": {"_model_type": "stablelm", "qk_layernorm": True},
}
# model_type -> (overrides, the refusal's words)
REFUSED: dict[str, tuple[dict, str]] = {
    "bart": ({"d_model": 64, "encoder_layers": 2, "decoder_layers": 2}, "it is an encoder-decoder model"),
    "t5": ({"d_model": 64, "num_layers": 2, "d_ff": 128, "d_kv": 16, "num_heads": 4}, "encoder-decoder"),
    "llava": ({}, "it has sub-models (vision_config in config.json)"),
    "minimax": ({}, "keeps a cache of its own"),
    "openai-gpt": ({}, "keeps no KV cache"),
    "xlnet": ({}, "keeps a cache of its own"),
    "gptq": ({"_model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}},
             "is quantized with gptq (config.json quantization_config): its stages run float weights"),
    "bitsandbytes": ({"_model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes",
                                                                     "load_in_4bit": True}},
                     "is quantized with bitsandbytes"),
}
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
NEW = 16


def _build(path: Path, model_type: str, overrides: dict) -> list[int]:
    """Save a tiny model of the family and return its 16 greedy tokens after `PROMPT` (``model.generate``),
    re-drawing the weights until they give at least 8 distinct tokens."""
    settings = {k: v for k, v in overrides.items() if not k.startswith("_")}
    config = transformers.AutoConfig.for_model(overrides.get("_model_type", model_type), **{**TINY, **settings})
    for seed in (0, 1, 2):
        for std in (0.3, 1.0, 0.1, 0.02):
            torch.manual_seed(seed)
            with quiet_transformers():
                model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() >= 2:
                        p.normal_(0, std)
            model.generation_config.eos_token_id = None
            model.generation_config.pad_token_id = 0
            with quiet_transformers():
                want = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False)[0, len(PROMPT):]
            if len(set(want.tolist())) >= 8:
                with quiet_transformers():
                    model.save_pretrained(path)
                if overrides.get("_store_head"):  # what a tied model's state_dict() saved as safetensors holds
                    from safetensors.torch import load_file, save_file

                    state = load_file(path / "model.safetensors")
                    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
                    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
                return want.tolist()
    raise AssertionError(f"{model_type}: no weights tried give 8 distinct tokens in {NEW}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    """A worker and two node agents of equal compute (the fastest plan splits every model in two)."""
    tmp = tmp_path_factory.mktemp("matrix")
    worker = WorkerProcess(f"sqlite:///{tmp / 'worker.db'}", log_path=tmp / "worker.log").start()
    agents = [subprocess.Popen([str(VENV_BIN / "williw"), "node", "--worker", worker.url, "--node-id", node,
                                "--compute-tflops", "4", "--memory-gb", "0.05", "--data-dir", str(tmp / node),
                                "--heartbeat-s", "0.3", "--poll-s", "0.1"],
                               stdout=open(tmp / f"{node}.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
              for node in ("node-a", "node-b")]
    client = WorkerClient(worker.url)
    try:
        _wait("two online nodes", lambda: len(client.list_nodes(online=True)) == 2, 60)
        yield worker, client, tmp
    finally:
        client.close()
        stop_processes(agents)
        worker.stop()


@dataclass
class Placed:
    request_id: str = ""
    plan: Plan | None = None
    want: list[int] = field(default_factory=list)
    error: BaseException | None = None  # building or placing it failed: its own test says so


@pytest.fixture(scope="module")
def placed(fleet) -> dict[str, Placed]:
    """Every family of `FAMILIES` built, planned and distributed at once (the nodes pull one after another while
    the next is planned), then waited for together: a family's test only generates."""
    worker, client, tmp = fleet
    out: dict[str, Placed] = {}
    servers = []
    try:
        for model_type, overrides in FAMILIES.items():
            out[model_type] = one = Placed()
            try:
                folder = tmp / model_type.replace(" ", "_").replace(",", "").replace("=", "_")
                one.want = _build(folder, model_type, overrides)
                one.request_id, one.plan, server = _place(client, folder, f"t/{folder.name}")
                servers.append(server)
            except Exception as exc:
                one.error = exc
        pending = [p.request_id for p in out.values() if p.error is None]
        _wait("every family ready", lambda: all(a["state"] == "ready" for rid in pending
                                                for a in client.request_assignments(rid)["assignments"]), 180)
    finally:
        for server in servers:
            server.shutdown()
    return out


def _place(client: WorkerClient, model: Path, name: str) -> tuple[str, Plan, ModelServer]:
    """Plan ``model`` on the fleet and start its distribution; the request id, its plan and the model's server."""
    rid = client.create_request(name, batch_size=1, sequence_length=64)["request_id"]
    plan = Plan.from_dict(client.process(rid, metadata=generate_metadata(model, model_name=name).to_dict())["plan"])
    server = ModelServer(model).start()
    client.distribute(rid, server.url)
    return rid, plan, server


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_greedy_tokens_through_two_node_processes_equal_model_generate(fleet, placed, model_type: str) -> None:
    one = placed[model_type]
    if one.error is not None:
        raise one.error
    assert len(one.plan.assignments) == 2, one.plan.to_dict()
    pipeline = Pipeline.from_worker(fleet[0].url, one.request_id)
    try:
        got = list(generate_tokens(pipeline, PROMPT, max_new_tokens=NEW))
    finally:
        pipeline.close()
    assert got == one.want


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_families_the_pipeline_cannot_generate_with_are_refused_in_one_line(model_type: str) -> None:
    overrides, words = REFUSED[model_type]
    model_type = overrides.get("_model_type", model_type)
    config = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in overrides.items() if k[0] != "_"})
    mapping = transformers.models.auto.modeling_auto
    for names in (mapping.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, mapping.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                  mapping.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES):
        if model_type in names:
            config.architectures = [names[model_type]]
            break
    with pytest.raises(GenerateError) as err:
        decode_rules(config)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"architecture '{config.architectures[0]}' ") and words in line


def test_williw_generate_refuses_an_encoder_decoder_model_in_one_line(fleet) -> None:
    """Through the CLI: BART is placed and distributed (metadata knows its two stacks), and ``williw generate``
    says why it cannot generate, naming the architecture, instead of a message about block counts."""
    worker, _, tmp = fleet
    torch.manual_seed(0)
    config = transformers.BartConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                     vocab_size=128, max_position_embeddings=64)
    with quiet_transformers():
        transformers.BartForConditionalGeneration(config).save_pretrained(tmp / "bart")
    client = fleet[1]
    rid, _, server = _place(client, tmp / "bart", "t/bart")
    try:
        _wait("bart ready", lambda: all(a["state"] == "ready" for a in client.request_assignments(rid)["assignments"]))
    finally:
        server.shutdown()
    out = subprocess.run([str(VENV_BIN / "williw"), "generate", "--worker", worker.url, "--request", rid, "hello"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr == ("error: architecture 'BartForConditionalGeneration' cannot generate over a pipeline of "
                          "stages: it is an encoder-decoder model (config.json is_encoder_decoder): every decoder "
                          "block also reads the encoder's output, so the stages do not pass one hidden state\n")


def test_a_stage_that_computes_nan_stops_the_generation_naming_its_node(fleet) -> None:
    """One weight of block 3 is NaN in the model, so in the shard of the node that runs block 3: ``williw
    generate`` stops with one line naming that node and the block, exit 2, and never prints a token."""
    worker, client, tmp = fleet
    model = tmp / "nan-llama"
    _build(model, "llama", {"vocab_size": 260})
    byte_tokenizer(model)
    path = model / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    state["model.layers.3.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    rid, plan, server = _place(client, model, "t/nan-llama")
    try:
        _wait("nan-llama ready", lambda: all(a["state"] == "ready"
                                             for a in client.request_assignments(rid)["assignments"]))
    finally:
        server.shutdown()
    node = next(a for a in plan.assignments if a.blocks[0] <= 3 < a.blocks[1])
    pipeline = Pipeline.from_worker(worker.url, rid)
    began = time.monotonic()
    try:
        with pytest.raises(GenerateError) as err:
            list(generate_tokens(pipeline, PROMPT, max_new_tokens=NEW))
    finally:
        pipeline.close()
    assert time.monotonic() - began < 5
    assert str(err.value) == (f"node '{node.node_id}' (blocks [{node.blocks[0]}, {node.blocks[1]})): block 3 "
                              f"computed NaN or Inf at positions [0, {len(PROMPT)}); the stage's weights or inputs "
                              f"are not what the model expects")
    out = subprocess.run([str(VENV_BIN / "williw"), "generate", "--worker", worker.url, "--request", rid, "hello"],
                         capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == f"error: {err.value}\n".replace(f"[0, {len(PROMPT)})", "[0, 5)")  # "hello": 5 bytes


SIDE_INPUTS = {
    "gemma4_text": ({"head_dim": 16, "sliding_window": 8, "vocab_size_per_layer_input": 128,
                     "layer_types": ["sliding_attention", "full_attention"] * 2},
                    "'Gemma4ForCausalLM': its blocks also receive 'per_layer_input'"),
    "zamba2": ({"mamba_d_state": 8, "mamba_headdim": 16, "n_mamba_heads": 8, "mamba_ngroups": 1,
                "hybrid_layer_ids": [1], "layers_block_type": ["mamba", "hybrid", "mamba", "mamba"]},
               "'Zamba2ForCausalLM': its blocks also receive 'original_hidden_states'"),
}


@pytest.mark.parametrize("model_type", sorted(SIDE_INPUTS))
def test_blocks_that_read_more_than_the_hidden_state_are_refused_in_one_line(fleet, model_type: str) -> None:
    """Gemma 4's blocks also read a per-layer input computed from the embeddings, Zamba2's hybrid blocks the
    embeddings themselves: the nodes refuse to build such stages, and the generation gets that one line, naming
    the architecture and the argument."""
    worker, client, tmp = fleet
    overrides, words = SIDE_INPUTS[model_type]
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    with quiet_transformers():
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp / model_type)
    rid, _, server = _place(client, tmp / model_type, f"t/{model_type}")
    try:
        _wait(f"{model_type} ready", lambda: all(a["state"] == "ready"
                                                 for a in client.request_assignments(rid)["assignments"]))
    finally:
        server.shutdown()
    pipeline = Pipeline.from_worker(worker.url, rid)
    try:
        with pytest.raises(GenerateError) as err:
            list(generate_tokens(pipeline, PROMPT, max_new_tokens=NEW))
    finally:
        pipeline.close()
    assert str(err.value) == (f"architecture {words}, computed from the token embeddings, besides the hidden state; "
                              f"pipeline stages pass only the hidden state, so its blocks cannot run as separate "
                              f"stages")
