"""The splitter on real generated models: shards byte-identical to the source, resume, refusals, the CLI."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import VENV_BIN
from test_split_helpers import greedy_plan, pipeline_plan, raw_tensors, source_raw
from williw import tinymodels
from williw.checkpoint import TensorInfo
from williw.errors import PlanError, SplitError
from williw.header import serialize_header
from williw.planner.plan import NodeAssignment, Plan, save_plan
from williw.shards import LocalFileSource, ShardSpec, read_manifest, sha256_file, write_shards
from williw.splitter import ModelSplitter, SplitConfig, check_shards, split_all
from williw.units import format_bytes

MODELS = ["tiny_llama", "tiny_llama_sharded", "tiny_llama_tied_bf16", "tiny_gpt2", "tiny_llama_fp16",
          "tiny_llama_bin", "tiny_llama_bin_sharded"]


@pytest.fixture(scope="session")
def tiny_llama_fp16(models_dir: Path) -> Path:
    path = models_dir / "llama-fp16-sharded"
    if not path.exists():
        tinymodels.build_causal_lm(path, "llama", dtype="float16", shard_bytes=100_000)
    return path


def _reference(model_dir: Path) -> dict[str, torch.Tensor]:
    from williw.checkpoint import load_torch_state_dict

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    for f in sorted(model_dir.glob("*.bin")):
        out.update(load_torch_state_dict(f))
    return out


@pytest.mark.parametrize("plan_kind", ["pipeline", "greedy"])
@pytest.mark.parametrize("model", MODELS)
def test_split_all_shards_are_byte_identical_to_the_source(model: str, plan_kind: str, request, tmp_path: Path):
    model_dir: Path = request.getfixturevalue(model)
    plan = pipeline_plan(model_dir) if plan_kind == "pipeline" else greedy_plan(model_dir)

    results = split_all(model_dir, plan, tmp_path / "shards")

    source, reference = source_raw(model_dir), _reference(model_dir)
    assert [r.node_id for r in results] == list(plan.node_ids)
    held: set[str] = set()
    for r, a in zip(results, plan.assignments, strict=True):
        shard = Path(r.shard_path)
        assert shard == tmp_path / "shards" / a.node_id / "model.safetensors"
        raw = raw_tensors(shard)
        assert sorted(raw) == sorted(a.tensor_names)
        assert all(raw[n] == source[n] for n in raw)
        loaded = load_file(shard)
        for name, tensor in loaded.items():
            assert tensor.dtype == reference[name].dtype and torch.equal(tensor, reference[name]), name
        manifest = read_manifest(shard.parent)
        assert manifest.file_sha256 == sha256_file(shard) == r.file_sha256
        assert manifest.file_bytes == shard.stat().st_size
        assert manifest.plan_sha256 == plan.digest()
        assert manifest.node_id == a.node_id and (manifest.stage, manifest.blocks) == (a.stage, a.blocks)
        assert {t.name: t.bytes for t in manifest.tensors} == {n: len(source[n]) for n in a.tensor_names}
        assert r.total_params == sum(t.numel() for t in loaded.values())
        assert (shard.parent / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()
        held |= set(raw)
    assert held == set(source)
    assert check_shards(tmp_path / "shards", plan, model_dir).ok


def test_tied_embedding_is_replicated_on_the_last_stage(tiny_llama_tied_bf16: Path, tmp_path: Path):
    plan = pipeline_plan(tiny_llama_tied_bf16, stages=2)
    split_all(tiny_llama_tied_bf16, plan, tmp_path)
    first = raw_tensors(tmp_path / "stage-0/model.safetensors")
    last = raw_tensors(tmp_path / "stage-1/model.safetensors")
    assert first["model.embed_tokens.weight"] == last["model.embed_tokens.weight"]
    assert "model.embed_tokens.weight" not in plan.assignments[1].layer_names


def test_any_piece_size_from_the_source_gives_the_same_shard(tiny_llama_sharded: Path, tmp_path: Path):
    from williw.checkpoint import open_checkpoint

    tensors = open_checkpoint(tiny_llama_sharded).tensors
    spec = ShardSpec("n", tuple(tensors[::3]))
    kw = dict(model_name="m", source_name="s", plan_sha256="0" * 64)
    a = write_shards([spec], LocalFileSource(tiny_llama_sharded), tmp_path / "a", **kw)
    b = write_shards([spec], LocalFileSource(tiny_llama_sharded, chunk_bytes=4093), tmp_path / "b", **kw)
    assert a[0].path.read_bytes() == b[0].path.read_bytes()
    assert a[0].manifest == b[0].manifest


class _ShortSource:
    def read_range(self, file: str, start: int, end: int):
        yield b"\0" * (end - start - 1)


def test_a_short_source_is_refused_and_leaves_no_shard(tmp_path: Path):
    spec = ShardSpec("n", (TensorInfo("w", "F32", (4,), "model.safetensors", 100, 116),))
    with pytest.raises(SplitError) as exc:
        write_shards([spec], _ShortSource(), tmp_path, model_name="m", source_name="s", plan_sha256="0" * 64)
    assert str(exc.value) == "'model.safetensors': the source returned 15 bytes for the range [100, 116), expected 16"
    assert list((tmp_path / "n").iterdir()) == []


def test_rerun_skips_complete_shards_and_redoes_a_damaged_one(tiny_llama: Path, tmp_path: Path):
    plan = greedy_plan(tiny_llama)
    first = split_all(tiny_llama, plan, tmp_path)
    assert [r.skipped for r in first] == [False, False, False]
    shard = Path(first[1].shard_path)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))

    again = split_all(tiny_llama, plan, tmp_path)

    assert [r.skipped for r in again] == [True, False, True]
    assert [r.file_sha256 for r in again] == [r.file_sha256 for r in first]
    assert check_shards(tmp_path, plan, tiny_llama).ok


def test_a_new_plan_redoes_every_shard(tiny_llama: Path, tmp_path: Path):
    split_all(tiny_llama, greedy_plan(tiny_llama, 2), tmp_path)
    plan = greedy_plan(tiny_llama, 2)
    plan = Plan(plan.strategy, plan.assignments, model_name="other")
    assert [r.skipped for r in split_all(tiny_llama, plan, tmp_path)] == [False, False]
    assert read_manifest(tmp_path / "node_000").plan_sha256 == plan.digest()


def test_seed_api_split_model_with_the_seed_plan_dict(tiny_gpt2: Path, tmp_path: Path):
    plan = greedy_plan(tiny_gpt2, 2)
    seed_dict = {a.node_id: {"node_id": a.node_id, "layer_names": list(a.layer_names), "total_compute": 100.0,
                             "compute_utilization": 0.5} for a in plan.assignments}
    config = SplitConfig("gpt2-tiny", str(tiny_gpt2), seed_dict, str(tmp_path))

    result = ModelSplitter().split_model(config, "node_001")

    assert result.node_id == "node_001" and result.layer_names == plan.assignments[1].layer_names
    assert result.shard_path == str(tmp_path / "node_001" / "model.safetensors")
    assert result.shard_size_mb == Path(result.shard_path).stat().st_size / 1024 / 1024
    assert not (tmp_path / "node_000").exists()
    assert read_manifest(tmp_path / "node_001").model_name == "gpt2-tiny"
    ModelSplitter.validate_split_plan(list(source_raw(tiny_gpt2)), seed_dict)
    with pytest.raises(PlanError) as exc:
        ModelSplitter.validate_split_plan(list(source_raw(tiny_gpt2)) + ["extra.weight"], seed_dict)
    assert str(exc.value) == "plan: layer 'extra.weight' is not assigned to any node"


def test_pth_format_holds_the_exact_tensors(tiny_llama_tied_bf16: Path, tmp_path: Path):
    plan = pipeline_plan(tiny_llama_tied_bf16, 2)
    results = split_all(tiny_llama_tied_bf16, plan, tmp_path, fmt="pth")
    reference = _reference(tiny_llama_tied_bf16)
    for r, a in zip(results, plan.assignments, strict=True):
        assert r.shard_path.endswith("model.pth")
        state = torch.load(r.shard_path, weights_only=True)
        assert set(state) == set(a.tensor_names)
        for name, t in state.items():
            assert t.dtype == torch.bfloat16 and torch.equal(t, reference[name])
    assert check_shards(tmp_path, plan, tiny_llama_tied_bf16).ok
    assert all(r.skipped for r in split_all(tiny_llama_tied_bf16, plan, tmp_path, fmt="pth"))


# --- refusals: one exact line, nothing written ------------------------------------------------------------------

def _plan_with(node_id: str, names: tuple[str, ...]) -> Plan:
    return Plan("greedy", (NodeAssignment(node_id, names, 1.0, 0.5),))


def test_refuses_a_tensor_the_model_lacks(tiny_llama: Path, tmp_path: Path):
    plan = _plan_with("a", ("model.norm.weight", "model.layers.9.mlp.up_proj.weight", "nope"))
    with pytest.raises(PlanError) as exc:
        split_all(tiny_llama, plan, tmp_path / "out")
    assert str(exc.value) == (f"plan: node 'a' has tensor 'model.layers.9.mlp.up_proj.weight' (and 1 more), which "
                              f"the model in '{tiny_llama}' does not have")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("node_id", ["../evil", "..", "a/b", "x" * 65, ""])
def test_refuses_unsafe_node_ids(node_id: str, tiny_llama: Path, tmp_path: Path):
    with pytest.raises(SplitError) as exc:
        split_all(tiny_llama, _plan_with(node_id, ("model.norm.weight",)), tmp_path / "out")
    assert str(exc.value) == ("plan: node_id must be 1-64 characters from A-Z a-z 0-9 . _ - (and not '.' or '..'), "
                              f"got {node_id!r}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()


def test_refuses_an_output_folder_inside_the_model(tiny_llama: Path):
    with pytest.raises(SplitError) as exc:
        split_all(tiny_llama, greedy_plan(tiny_llama), tiny_llama / "shards")
    assert str(exc.value) == (f"output folder '{tiny_llama / 'shards'}' is inside the model folder '{tiny_llama}'; "
                              "choose a folder outside it")
    assert not (tiny_llama / "shards").exists()


# --- CLI --------------------------------------------------------------------------------------------------------

def test_cli_split_all_then_node_rerun_is_skipped(williw, tiny_llama_sharded: Path, tmp_path: Path):
    plan = pipeline_plan(tiny_llama_sharded)
    save_plan(plan, tmp_path / "plan.json")
    out = tmp_path / "shards"

    proc = williw("split", str(tiny_llama_sharded), "--plan", str(tmp_path / "plan.json"), "--all", "-o", str(out),
                  "--json", check=True)
    first = json.loads(proc.stdout)
    again = json.loads(williw("split", str(tiny_llama_sharded), "--plan", str(tmp_path / "plan.json"),
                              "--node", "stage-1", "-o", str(out), "--json", check=True).stdout)

    assert [s["status"] for s in first["shards"]] == ["written"] * 3
    assert [(s["node_id"], s["status"]) for s in again["shards"]] == [("stage-1", "skipped")]
    check = williw("check-shards", str(out), "--plan", str(tmp_path / "plan.json"), "--model",
                   str(tiny_llama_sharded))
    assert check.returncode == 0 and check.stdout.endswith("all shards match the model\n")


def test_cli_errors_are_one_line_with_exit_2(williw, tiny_llama: Path, tmp_path: Path):
    save_plan(_plan_with("a", ("missing.weight",)), tmp_path / "plan.json")
    proc = williw("split", str(tiny_llama), "--plan", str(tmp_path / "plan.json"), "--all", "-o", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: plan: node 'a' has tensor 'missing.weight', which the model in '{tiny_llama}' "
                           "does not have\n")
    proc = williw("split", str(tiny_llama), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and "give either --node ID (repeatable) or --all" in proc.stderr


def test_split_of_safetensors_does_not_import_torch(tiny_llama: Path, tmp_path: Path):
    save_plan(greedy_plan(tiny_llama, 2), tmp_path / "plan.json")
    code = ("import sys; from williw.cli import cli; "
            f"cli.main(['split', {str(tiny_llama)!r}, '--plan', {str(tmp_path / 'plan.json')!r}, '--all', '-o', "
            f"{str(tmp_path / 'o')!r}, '--json'], standalone_mode=False); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().endswith("[]")


def test_a_split_larger_than_the_free_space_is_refused_before_anything_is_written(tmp_path: Path):
    # A sparse model file whose one tensor is larger than the whole disk: it takes no space, and the split must
    # refuse it from the sizes alone, before it creates a folder or reads a byte.
    model = tmp_path / "model"
    model.mkdir()
    nbytes = shutil.disk_usage(tmp_path).total + (1 << 30)
    prefix, _ = serialize_header([("big.weight", "U8", (nbytes,))])
    with open(model / "model.safetensors", "wb") as f:
        f.write(prefix)
        f.truncate(len(prefix) + nbytes)
    save_plan(Plan("greedy", (NodeAssignment("n1", ("big.weight",), 1.0, 0.5),)), tmp_path / "plan.json")
    out = tmp_path / "out" / "shards"

    # Should the check ever be lost, a file size limit of 64 MiB stops the split long before it fills the disk.
    proc = subprocess.run([str(VENV_BIN / "williw"), "split", str(model), "--plan", str(tmp_path / "plan.json"),
                           "--all", "-o", str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WILLIW_NO_PROGRESS": "1"},
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20)))

    assert proc.returncode == 2 and proc.stdout == ""
    need = format_bytes(len(prefix) + nbytes)
    assert re.fullmatch(rf"error: '{re.escape(str(out))}': the shards need {re.escape(need)} but only "
                        r"[0-9.]+ [KMGT]?B is free\n", proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


def test_no_progress_bar_when_stderr_is_not_a_terminal(tiny_llama: Path, tmp_path: Path) -> None:
    """A bar in a pipe or a log file is carriage-return noise (a node's log held every gather bar's frames)."""
    import os
    import subprocess

    from conftest import VENV_BIN
    from test_split_helpers import greedy_plan
    from williw.planner.plan import save_plan

    save_plan(greedy_plan(tiny_llama), tmp_path / "plan.json")
    env = {k: v for k, v in os.environ.items() if k != "WILLIW_NO_PROGRESS"}
    proc = subprocess.run([str(VENV_BIN / "williw"), "split", str(tiny_llama), "--plan", str(tmp_path / "plan.json"),
                           "-o", str(tmp_path / "out"), "--all"], capture_output=True, text=True, env=env, timeout=120)
    assert (proc.returncode, proc.stderr) == (0, "")
