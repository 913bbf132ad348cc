"""Prove that the shards still compute the model: run them as a pipeline and compare with the full model.

The full model is loaded normally with transformers, run once on the prompt and freed; it leaves its output and
the hidden state at every stage boundary. Then each stage is built from its own shard and ``config.json`` alone
(`williw.stages`), runs on the previous stage's hidden state (sent through safetensors bytes, as between nodes),
and is freed before the next one loads, so the pipeline never holds more than one stage's weights.

A greedy plan's nodes do not form a pipeline; its shards are reassembled into one model whose output must equal
the original's.

Memory is the process's resident set size (RSS), sampled every 5 ms while a stage loads and runs; the peak counts
everything in the process (Python, torch, the reference's output), the delta only what the stage added.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from williw.classify import block_of, find_block_prefix
from williw.errors import VerifyError, require_torch
from williw.planner.plan import Plan, load_plan
from williw.verify_report import (
    TOLERANCES,
    Meter,
    StageReport,
    VerifyReport,
    compare,
    differs,
)

if TYPE_CHECKING:
    import torch

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog."
SHARD_FILE = "model.safetensors"

def verify_shards(model_dir: str | os.PathLike[str], plan: Plan | str | os.PathLike[str],
                  shards_dir: str | os.PathLike[str], *, prompt: str = DEFAULT_PROMPT, dtype: str = "float32",
                  atol: float | None = None, rtol: float | None = None, weights: str = "as-stored",
                  device: str = "cpu") -> VerifyReport:
    """Run the shards of ``plan`` in plan order and compare their output with the full model's.

    Args:
        model_dir: the original model folder (config.json and weights).
        plan: a `Plan` or the path of its JSON.
        shards_dir: holds ``<node_id>/model.safetensors`` and ``<node_id>/config.json`` per node.
        prompt: the input text; token ids come from the model's tokenizer, else UTF-8 bytes modulo the vocabulary.
        dtype: compute dtype (float32, float64, bfloat16, float16, or auto for the checkpoint's).
        atol, rtol: override the tolerance (default: exact in float32/float64, `TOLERANCES` otherwise).
        weights: the blocks' linear weights in this format (`williw.precision`), in the stages and in the whole
            model alike (`williw.quantize.quantize_linears`): on the CPU the two give the same bits.
        device: ``cpu``, ``cuda[:N]`` or ``mps`` (`williw.devices.resolve_device`), for both.

    Returns:
        The report; ``report.ok`` is False and ``report.failure`` names the first stage that differs (and the
        tensor, when one differs from the model's) if the outputs do not match.

    Raises:
        VerifyError: unsupported architecture, stages out of order, a missing shard or tensor, an empty prompt.
        MissingDependency: torch is not installed.
    """
    require_torch("verify")
    from williw.progress import quiet_transformers

    with quiet_transformers():
        return _verify(Path(model_dir), plan, Path(shards_dir), prompt, dtype, atol, rtol, (weights, device))


def _verify(model_dir: Path, plan: Plan | str | os.PathLike[str], shards_dir: Path, prompt: str, dtype: str,
            atol: float | None, rtol: float | None, run_as: tuple[str, str]) -> VerifyReport:
    import torch

    from williw.precision import WEIGHTS

    if run_as[0] not in WEIGHTS:
        raise VerifyError(f"weights '{run_as[0]}' is not one of {', '.join(WEIGHTS)}")

    from williw import stages as st

    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    config = st.load_config(model_dir)
    arch_name, cls = st.model_class(config)
    name = config.dtype if dtype == "auto" else dtype
    name = str(name or "float32").removeprefix("torch.")
    if name not in TOLERANCES:
        raise VerifyError(f"dtype '{dtype}' is not supported (use one of auto, {', '.join(TOLERANCES)})")
    torch_dtype = getattr(torch, name)
    atol = TOLERANCES[name][0] if atol is None else atol
    rtol = TOLERANCES[name][1] if rtol is None else rtol
    ids, token_source = token_ids(model_dir, prompt, config.vocab_size)
    n_blocks = config.get_text_config().num_hidden_layers
    pipeline = plan.strategy == "pipeline"
    specs = pipeline_stages(plan, n_blocks) if pipeline else [(a.node_id, (0, n_blocks)) for a in plan.assignments]
    for node_id, _ in specs:
        if not (shards_dir / node_id / SHARD_FILE).is_file():
            raise VerifyError(f"node '{node_id}': no shard at '{shards_dir / node_id / SHARD_FILE}'")

    boundaries = [end - 1 for _, (_, end) in specs[:-1] if end > 0] if pipeline else []
    reference, ref_out, ref_hidden = _reference(model_dir, cls, torch_dtype, ids, boundaries, run_as)
    if pipeline:
        note = f"{len(specs)} stages run one at a time, each from its own shard"
        if run_as != ("as-stored", "cpu"):
            note += f", weights {run_as[0]} on {run_as[1]}"
        reports, out, failure = _pipeline(specs, shards_dir, model_dir, cls, torch_dtype, ids, ref_hidden,
                                          atol, rtol, run_as)
    else:
        note = (f"a {plan.strategy} plan cannot run as a pipeline: checked instead that the shards of "
                f"{len(specs)} nodes reassemble into the full model")
        reports, out = _reassembled(plan, shards_dir, cls, torch_dtype, ids)
        failure = None
    outputs = tuple(compare(n, out[n], ref_out[n], atol, rtol) for n in ref_out if n in out)
    bad = next((o for o in outputs if not o.match), None)
    if failure is None and bad is not None:
        where = f"stage {len(specs) - 1} (node '{specs[-1][0]}', blocks [{specs[-1][1][0]}, {specs[-1][1][1]}))" \
            if pipeline else "reassembled model"
        failure = f"{where}: {differs(bad.name, bad, atol, rtol)}"
        if pipeline:
            failure = _with_culprit(failure, model_dir, shards_dir / specs[-1][0] / SHARD_FILE)
    return VerifyReport(model_dir=str(model_dir), architecture=arch_name, mode="pipeline" if pipeline else
                        "reassembled", note=note, dtype=name, prompt=prompt, tokens=int(ids.shape[1]),
                        token_source=token_source, atol=atol, rtol=rtol, reference=reference,
                        stages=tuple(reports), outputs=outputs, failure=failure)


def pipeline_stages(plan: Plan, n_blocks: int) -> list[tuple[str, tuple[int, int]]]:
    """Each node's blocks ``[start, end)`` in plan order, checked to chain from block 0 to ``n_blocks``.

    Blocks come from the plan's ``blocks`` field, else from the block indices of the node's tensor names.

    Raises:
        VerifyError: a stage does not start where the previous one ended, or the last ends short of the model.
    """
    prefix = find_block_prefix(n for a in plan.assignments for n in a.layer_names)
    specs, expected = [], 0
    for i, a in enumerate(plan.assignments):
        if a.blocks is not None:
            blocks = a.blocks
        else:
            found = [b for b in (block_of(n, prefix) for n in a.layer_names) if b is not None]
            blocks = (min(found), max(found) + 1) if found else (expected, expected)
        if blocks[0] != expected:
            raise VerifyError(f"stages out of order: stage {i} (node '{a.node_id}') starts at block {blocks[0]}, "
                              f"expected block {expected}")
        specs.append((a.node_id, (blocks[0], blocks[1])))
        expected = blocks[1]
    if expected != n_blocks:
        raise VerifyError(f"the pipeline ends at block {expected}, but the model has {n_blocks} blocks")
    return specs


def token_ids(model_dir: Path, prompt: str, vocab_size: int) -> tuple[torch.Tensor, str]:
    """The prompt as a ``[1, tokens]`` tensor: the model's tokenizer if it ships one, else UTF-8 bytes modulo the
    vocabulary size (deterministic, and every id is valid).

    Raises:
        VerifyError: the prompt gives no tokens.
    """
    import torch

    if any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")):
        from transformers import AutoTokenizer

        ids, source = list(AutoTokenizer.from_pretrained(model_dir)(prompt)["input_ids"]), "tokenizer"
    else:
        ids, source = [b % vocab_size for b in prompt.encode("utf-8")], "bytes"
    if not ids:
        raise VerifyError("the prompt is empty: give verify some text to run (--prompt)")
    return torch.tensor([ids], dtype=torch.long), source


def _with_culprit(failure: str, model_dir: Path, shard: Path) -> str:
    """Name the first tensor of the shard whose bytes differ from the model's, if any does."""
    from safetensors import safe_open

    from williw.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    with safe_open(shard, framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            info = ckpt.by_name.get(name)
            if info is None:
                continue
            with safe_open(model_dir / info.file, framework="pt") as src:
                a, b = f.get_tensor(name), src.get_tensor(name)
            if a.dtype != b.dtype or a.shape != b.shape or not _bytes(a).equal(_bytes(b)):
                return f"{failure}; tensor '{name}' in '{shard}' differs from the model's"
    return failure


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (so that NaN equals NaN and -0.0 differs from 0.0)."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8)


def _free() -> None:
    gc.collect()


def _reference(model_dir: Path, cls: Any, dtype: torch.dtype, ids: torch.Tensor, boundaries: list[int],
               run_as: tuple[str, str]) -> tuple[StageReport, dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """Load the full model the ordinary way, convert its blocks' weights as the stages do, run it, keep its outputs
    and boundary hidden states, free it."""
    import torch

    from williw.quantize import quantize_linears, to_device
    from williw.stages import align, block_stack, model_outputs

    hidden: dict[int, torch.Tensor] = {}
    with Meter() as meter, _checkpoint_view(model_dir) as view:
        model = cls.from_pretrained(view, dtype=dtype).eval()
        align(model)
        loaded = time.perf_counter()
        _, stack = block_stack(model)
        _convert(quantize_linears, list(stack), run_as)
        to_device(model, run_as[1])
        for j in boundaries:
            def keep(_m: Any, _i: Any, out: Any, j: int = j) -> None:
                hidden[j] = (out[0] if isinstance(out, tuple) else out).detach().cpu().clone()
            stack[j].register_forward_hook(keep)
        with torch.no_grad():
            result = model(input_ids=ids.to(run_as[1]), use_cache=False)
        outputs = {n: v.detach().cpu().clone() for n, v in model_outputs(result).items()}
        report = StageReport(stage=-1, node_id="full model", blocks=(0, len(stack)),
                             tensors=len(model.state_dict()), parameters=sum(p.numel() for p in model.parameters()),
                             load_s=loaded - meter.start, run_s=time.perf_counter() - loaded, peak_rss_bytes=0,
                             rss_delta_bytes=0, max_abs_diff=None)
        del model, result, stack
        _free()
    return _with_memory(report, meter), outputs, hidden


@contextmanager
def _checkpoint_view(model_dir: Path) -> Iterator[Path]:
    """A temporary folder of links to ``model_dir``'s files, holding only the weight files that
    `checkpoint_files` chooses: from_pretrained then reads the same checkpoint as split and pull (not a stray
    ``model.safetensors`` next to an index, nor Mistral's ``consolidated.safetensors``)."""
    import tempfile

    from williw.checkpoint import checkpoint_files

    chosen, ignored = checkpoint_files(model_dir)
    skip = {p.resolve() for p in ignored}
    with tempfile.TemporaryDirectory(prefix="williw-reference-") as tmp:
        view = Path(tmp)
        for entry in model_dir.iterdir():
            if entry.is_file() and entry.resolve() not in skip:
                (view / entry.name).symlink_to(entry.resolve())
        for path in chosen:  # chosen files may sit in a subfolder named by an index
            link = view / path.relative_to(model_dir)
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(path.resolve())
        yield view


def _with_memory(report: StageReport, meter: Meter) -> StageReport:
    return replace(report, peak_rss_bytes=meter.peak, rss_delta_bytes=meter.peak - meter.before)


def _send(hidden: torch.Tensor) -> torch.Tensor:
    """What the next node receives: the hidden state serialised and parsed back, as over a socket."""
    from safetensors.torch import load, save

    from williw.stages import ALIGNMENT

    received = load(save({"hidden": hidden.contiguous()}))["hidden"]
    return received.clone() if received.data_ptr() % ALIGNMENT else received


def _convert(quantize: Any, blocks: list[Any], run_as: tuple[str, str]) -> None:
    try:
        quantize(blocks, run_as[0], device=run_as[1])
    except ValueError as exc:
        raise VerifyError(str(exc)) from None


def _pipeline(specs: list[tuple[str, tuple[int, int]]], shards_dir: Path, model_dir: Path, cls: Any,
              dtype: torch.dtype, ids: torch.Tensor, ref_hidden: dict[int, torch.Tensor], atol: float,
              rtol: float, run_as: tuple[str, str]) -> tuple[list[StageReport], dict[str, torch.Tensor], str | None]:
    from williw import stages as st
    from williw.quantize import quantize_linears, to_device
    from williw.shards.reader import ShardReader

    reports, failure, x, out = [], None, ids, {}
    for i, (node_id, blocks) in enumerate(specs):
        where = f"stage {i} (node '{node_id}', blocks [{blocks[0]}, {blocks[1]}))"
        shard = shards_dir / node_id / SHARD_FILE
        with Meter() as meter:
            config = st.load_config(shards_dir / node_id)
            with ShardReader(shard) as f:
                state = f.read_all()
            stage = st.build_stage(config, cls, blocks, state, dtype, where=where, source=f"shard '{shard}'")
            del state
            _convert(quantize_linears, [stage.stack[j] for j in range(*blocks)], run_as)
            to_device(stage.model, run_as[1])
            loaded = time.perf_counter()
            x = x.to(run_as[1])
            out = {k: v.cpu() for k, v in st.run_stage(stage, x.to(dtype) if x.is_floating_point() else x).items()}
            ran = time.perf_counter()
            report = StageReport(stage=i, node_id=node_id, blocks=blocks, tensors=len(stage.loaded),
                                 parameters=stage.parameters, load_s=loaded - meter.start, run_s=ran - loaded,
                                 peak_rss_bytes=0, rss_delta_bytes=0, max_abs_diff=None, ignored=tuple(stage.ignored))
            del stage
            _free()
        report = _with_memory(report, meter)
        if "hidden" in out:
            x = _send(out["hidden"])
            want = ref_hidden.get(blocks[1] - 1)
            if want is not None:
                d = compare("hidden", x, want, atol, rtol)
                report = replace(report, max_abs_diff=d.max_abs_diff)
                if failure is None and not d.match:
                    what = f"the hidden state after block {blocks[1] - 1} differs"
                    failure = _with_culprit(f"{where}: {differs(what, d, atol, rtol)}", model_dir, shard)
        reports.append(report)
    return reports, out, failure


def _reassembled(plan: Plan, shards_dir: Path, cls: Any, dtype: torch.dtype,
                 ids: torch.Tensor) -> tuple[list[StageReport], dict[str, torch.Tensor]]:
    from williw import stages as st
    from williw.shards.reader import ShardReader

    state: dict[str, Any] = {}
    with Meter() as meter:
        for a in plan.assignments:
            shard = shards_dir / a.node_id / SHARD_FILE
            with ShardReader(shard) as handle:
                keys = handle.keys()
                for n in a.layer_names:
                    if n not in keys:
                        raise VerifyError(f"node '{a.node_id}': tensor '{n}' is missing from shard '{shard}'")
                    state.setdefault(n, handle.get_tensor(n))
        config = st.load_config(shards_dir / plan.assignments[0].node_id)
        n_blocks = config.get_text_config().num_hidden_layers
        stage = st.build_stage(config, cls, (0, n_blocks), state, dtype, where="reassembled model",
                               source="every shard")
        state.clear()
        loaded = time.perf_counter()
        out = st.run_stage(stage, ids)
        report = StageReport(stage=0, node_id="+".join(plan.node_ids), blocks=(0, n_blocks),
                             tensors=len(stage.loaded), parameters=stage.parameters, load_s=loaded - meter.start,
                             run_s=time.perf_counter() - loaded, peak_rss_bytes=0, rss_delta_bytes=0,
                             max_abs_diff=None)
        del stage
        _free()
    return [_with_memory(report, meter)], out
