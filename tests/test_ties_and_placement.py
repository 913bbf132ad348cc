"""Where each tensor runs is what the model's own forward says (issue 29): the metadata's role of every tensor
("first", "block", "last") and its tied head agree with a trace of the model that transformers loads, and the
shards of the cases that went wrong compute the model bit-exactly.

The cases: GPT-BigCode with ``vocab_size == n_positions`` (its position table has the token table's shape and was
taken for the tied head), a tied Llama checkpoint that also stores ``lm_head.weight`` (the tie was dropped and the
last stage got a tensor the model does not use), and OPT with ``word_embed_proj_dim != hidden_size`` (opt-350m's
``project_in`` runs before block 0 but was placed last).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from williw import tinymodels as factories  # noqa: E402
from williw.errors import SplitError  # noqa: E402
from williw.metadata import generate_metadata  # noqa: E402
from williw.planner import pipeline_from_cuts  # noqa: E402
from williw.planner.plan import save_plan  # noqa: E402
from williw.progress import quiet_transformers  # noqa: E402
from williw.splitter import check_shards, split_all  # noqa: E402
from williw.stages import _passthrough, _trace_phases, block_stack  # noqa: E402
from williw.verify import verify_shards  # noqa: E402


def traced_roles(model_dir: Path, names: list[str]) -> tuple[dict[str, str | None], set[str]]:
    """Where the model that ``from_pretrained`` loads uses each checkpoint tensor: ``block``, ``first`` (before
    block 0), ``last`` (after the last block only), ``tied`` (loaded, then replaced by a tie: the model never uses
    it), or None; and the checkpoint names of the tensors a tied head reuses."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    with quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(model_dir)
        model = getattr(transformers, config.architectures[0]).from_pretrained(model_dir).eval()
    prefix, stack = block_stack(model)
    for i in range(len(stack)):
        stack[i] = _passthrough(stack[i])
    phases = _trace_phases(model, stack)
    mapping = get_model_conversion_mapping(model)
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
    state = model.state_dict()
    tied = model.all_tied_weights_keys  # target -> source, what from_pretrained actually tied
    roles: dict[str, str | None] = {}
    sources = set()
    for name in names:
        key = rename_source_key(name, renamings, converters, model.base_model_prefix, state)[0]
        used = phases.get(key, set())
        roles[name] = ("block" if key.startswith(f"{prefix}.") else "tied" if key in tied
                       else "first" if "before" in used else "last" if "after" in used else None)
        if key in tied.values():
            sources.add(name)
    return roles, sources


def assert_placed_as_traced(model_dir: Path) -> None:
    meta = generate_metadata(model_dir)
    placed = {x.name: "tied" if x.note == "tied" else x.role for x in meta.layers}
    traced, sources = traced_roles(model_dir, list(placed))
    assert placed == traced
    assert ({meta.tied_lm_head.tensor} if meta.tied_lm_head else set()) == sources


@pytest.fixture(scope="module")
def bigcode_square(models_dir: Path) -> Path:
    """GPT-BigCode, tied, vocab_size == n_positions == 128."""
    path = models_dir / "bigcode-square"
    return path if path.exists() else factories.build_family(path, "gpt_bigcode")


@pytest.fixture(scope="module")
def llama_stored_head(models_dir: Path) -> Path:
    path = models_dir / "llama-stored-head"
    return path if path.exists() else factories.build_stored_tied_head(path)


@pytest.fixture(scope="module")
def opt_projected(models_dir: Path) -> Path:
    """OPT in opt-350m's layout: 32-wide embeddings, 64-wide blocks, project_in and project_out."""
    path = models_dir / "opt-projected"
    return path if path.exists() else factories.build_family(path, "opt")


CASES = ("bigcode_square", "llama_stored_head", "opt_projected")


@pytest.mark.parametrize("case", CASES)
def test_metadata_places_every_tensor_where_the_model_uses_it(case: str, request: pytest.FixtureRequest) -> None:
    assert_placed_as_traced(request.getfixturevalue(case))


def test_bigcode_head_is_the_token_table_not_the_position_table(bigcode_square: Path) -> None:
    meta = generate_metadata(bigcode_square)
    by_name = {x.name: x for x in meta.layers}
    assert by_name["transformer.wpe.weight"].shape == by_name["transformer.wte.weight"].shape == (128, 64)
    assert meta.tied_lm_head is not None and meta.tied_lm_head.tensor == "transformer.wte.weight"


def test_stored_head_under_a_tie_is_a_copy_the_last_stage_carries(llama_stored_head: Path) -> None:
    meta = generate_metadata(llama_stored_head, batch_size=1, sequence_length=8)
    head = next(x for x in meta.layers if x.name == "lm_head.weight")
    assert (head.placement, head.role, head.note, head.num_params, head.compute_required) == \
        ("last", "last", "tied", 0, 0.0)
    assert head.bytes == 128 * 64 * 4  # stored, and shipped with the last stage
    assert meta.tied_lm_head is not None and meta.tied_lm_head.tensor == "model.embed_tokens.weight"
    assert meta.tied_lm_head.compute_required == 2 * 8 * 128 * 64 / 1e9
    with quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(llama_stored_head)
    assert meta.total_params == model.num_parameters()  # the tied table counted once


def test_opt_project_in_runs_first_and_project_out_last(opt_projected: Path) -> None:
    roles = {x.name: x.role for x in generate_metadata(opt_projected).layers if x.role != "block"}
    assert roles == {"model.decoder.embed_tokens.weight": "first", "model.decoder.embed_positions.weight": "first",
                     "model.decoder.project_in.weight": "first", "model.decoder.project_out.weight": "last"}


@pytest.mark.parametrize("cuts", [[2], [1, 3]], ids=["2-stages", "3-stages"])
@pytest.mark.parametrize("case", CASES)
def test_split_shards_are_bit_exact(case: str, cuts: list[int], request: pytest.FixtureRequest,
                                    tmp_path: Path) -> None:
    model = request.getfixturevalue(case)
    plan = pipeline_from_cuts(generate_metadata(model), cuts, [f"n{i}" for i in range(len(cuts) + 1)])
    shards = tmp_path / "shards"
    split_all(model, plan, shards)
    assert check_shards(shards, plan, model).ok

    report = verify_shards(model, plan, shards)

    assert report.ok, report.failure
    assert all(s.max_abs_diff == 0.0 for s in report.stages[:-1])
    assert report.outputs and all(o.max_abs_diff == 0.0 for o in report.outputs)


def test_check_shards_cli_accepts_the_stored_head(llama_stored_head: Path, tmp_path: Path, williw) -> None:
    plan = pipeline_from_cuts(generate_metadata(llama_stored_head), [2], ["n0", "n1"])
    save_plan(plan, tmp_path / "plan.json")
    split_all(llama_stored_head, plan, tmp_path / "shards")
    assert plan.assignments[-1].tensor_names[-1] == "model.embed_tokens.weight"  # the tied head's replica
    proc = williw("check-shards", str(tmp_path / "shards"), "--plan", str(tmp_path / "plan.json"), "--model",
                  str(llama_stored_head), "--json", check=True)
    assert json.loads(proc.stdout)["ok"] is True


def test_split_refuses_a_stored_head_that_differs_from_the_tied_table(tmp_path: Path) -> None:
    # transformers ties the two only when their values are equal; otherwise it runs lm_head.weight untied.
    model = factories.build_stored_tied_head(tmp_path / "model", same=False)
    plan = pipeline_from_cuts(generate_metadata(model), [2], ["n0", "n1"])
    with pytest.raises(SplitError) as err:
        split_all(model, plan, tmp_path / "shards")
    assert str(err.value) == (
        f"'{model / 'config.json'}': tie_word_embeddings is true, so the output head is 'model.embed_tokens.weight', "
        "but the checkpoint also stores 'lm_head.weight' with other values, which transformers runs untied; set "
        "tie_word_embeddings to false in config.json and make the metadata and plan again")
    assert not (tmp_path / "shards").exists()
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))  # the fix it names
    plan = pipeline_from_cuts(generate_metadata(model), [2], ["n0", "n1"])
    split_all(model, plan, tmp_path / "shards")
    assert verify_shards(model, plan, tmp_path / "shards").ok


def test_stored_head_in_a_torch_file_shares_the_table(llama_stored_head: Path, tmp_path: Path) -> None:
    """transformers 4 saved ``.bin`` files as ``torch.save(model.state_dict())``: a tied head is stored twice, one
    storage."""
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(llama_stored_head / "config.json", model)
    with quiet_transformers():
        loaded = transformers.AutoModelForCausalLM.from_pretrained(llama_stored_head)
    torch.save(loaded.state_dict(), model / "pytorch_model.bin")
    assert_placed_as_traced(model)
    plan = pipeline_from_cuts(generate_metadata(model), [1, 3], ["n0", "n1", "n2"])
    split_all(model, plan, tmp_path / "shards")
    assert verify_shards(model, plan, tmp_path / "shards").ok


# Decoder families that transformers builds from tiny configs (`williw.tinymodels.FAMILIES`), tied where the family
# can be: in each, the metadata's role of every tensor is where the loaded model's forward uses it.
FAMILY_CASES = [
    ("llama", False), ("qwen2", True), ("qwen3", True), ("mistral", None), ("gemma", None), ("gemma2", None),
    ("gemma3_text", None), ("gpt2", None), ("gpt_bigcode", None), ("opt", None), ("falcon", None), ("phi", False),
    ("phi3", True), ("gpt_neox", False), ("bloom", None), ("starcoder2", None), ("olmo2", False), ("mixtral", False),
    ("qwen2_moe", False), ("stablelm", False), ("cohere", None), ("granite", True), ("gptj", False),
    ("codegen", False), ("xglm", None), ("biogpt", None),
]


@pytest.mark.parametrize(("family", "tie"), FAMILY_CASES,
                         ids=[f"{f}-{ {True: 'tied', False: 'untied'}.get(t, 'default')}" for f, t in FAMILY_CASES])
def test_family_roles_agree_with_the_trace(family: str, tie: bool | None, tmp_path: Path) -> None:
    assert_placed_as_traced(factories.build_family(tmp_path / "model", family, tie=tie))


def test_plan_gives_project_in_to_the_first_stage(opt_projected: Path) -> None:
    plan = pipeline_from_cuts(generate_metadata(opt_projected), [1, 3], ["n0", "n1", "n2"])
    where = {n: a.node_id for a in plan.assignments for n in a.tensor_names if "project" in n}
    assert where == {"model.decoder.project_in.weight": "n0", "model.decoder.project_out.weight": "n2"}
