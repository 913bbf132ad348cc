"""``williw verify --batch-size B --context-length C``: each stage's measured peak memory against the planner's.

Each stage is built from its shard (`williw.stages`) in a process of its own, as on its node, and run once on
``B`` sequences of ``C`` tokens with the model's own ``DynamicCache``, so its cache ends filled to the context:
token ids for the first stage, a hidden state of zeros for the others (memory does not depend on the values).
Measured: the bytes of the stage's loaded weights (its parameters and buffers off the meta device) plus the growth
of the process's peak resident set while it runs (``VmHWM``, reset through ``/proc/self/clear_refs`` after
loading, minus ``VmRSS`` then; Linux), so it counts weights, cache and transients but not the loader's own copies
(nor one-time buffers: a warm-up run on 8 tokens goes first). glibc keeps tensors of 64 KiB and more in mappings of
their own, returned when freed (``mallopt``), and trims the heap (``malloc_trim``) before the measurement.
Predicted: `williw.planner.costs` for the same stage at batch ``B`` and context ``C`` (the whole context
prefilled in one pass: ``S = C``).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from williw.errors import VerifyError, require_torch
from williw.planner.plan import Plan, load_plan


@dataclass(frozen=True)
class StageMemory:
    """One stage: ``predicted_bytes`` (weights + KV cache + activations) and ``measured_bytes`` (peak RSS growth)."""

    stage: int
    node_id: str
    blocks: tuple[int, int]
    predicted_bytes: int
    kv_bytes: int
    measured_bytes: int

    @property
    def ratio(self) -> float:
        """measured / predicted."""
        return self.measured_bytes / self.predicted_bytes if self.predicted_bytes else float("inf")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise VerifyError(f"/proc/self/status has no {field}: peak memory is measured on Linux only")


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _trim() -> None:
    import ctypes

    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        # Tensors of 64 KiB and more get their own mapping, returned to the system when freed: glibc otherwise
        # raises this threshold after the first free (up to 32 MiB) and serves later tensors from a heap whose
        # freed holes stay resident, so the peak would count fragmentation, not tensors.
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed pages may stay resident (the growth then reads low)
        pass


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (Linux >= 4.0)
        f.write("5")


def measure_stages(model_dir: str | os.PathLike[str], plan: Plan | str | os.PathLike[str],
                   shards_dir: str | os.PathLike[str], *, batch_size: int, context_length: int,
                   dtype: str = "float32", weights: str = "as-stored") -> list[StageMemory]:
    """Run every stage of a pipeline plan with its KV cache filled to ``context_length`` for ``batch_size``
    sequences, and report its measured peak memory next to the planner's prediction; at compute ``dtype`` with the
    blocks' linear weights in format ``weights`` (`williw.quantize`), priced by the planner at that precision.

    Raises:
        VerifyError: not a pipeline plan, a missing shard, a batch or context below 1, or not Linux.
        MissingDependency: torch is not installed.
    """
    require_torch("verify")
    from williw.progress import quiet_transformers

    if batch_size < 1 or context_length < 1:
        raise VerifyError(f"batch size and context length must be >= 1, got {batch_size} and {context_length}")
    with quiet_transformers():
        return _measure(Path(model_dir), plan if isinstance(plan, Plan) else load_plan(plan), Path(shards_dir),
                        batch_size, context_length, (dtype, weights))


def _measure(model_dir: Path, plan: Plan, shards_dir: Path, batch: int, context: int,
             run_as: tuple[str, str]) -> list[StageMemory]:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from williw import stages as st
    from williw.metadata import generate_metadata
    from williw.planner.costs import pipeline_model
    from williw.precision import Precision
    from williw.verify import SHARD_FILE, pipeline_stages

    if plan.strategy != "pipeline":
        raise VerifyError(f"a {plan.strategy} plan has no stages to measure: measure a pipeline plan")
    config = st.load_config(model_dir)
    model = pipeline_model(generate_metadata(model_dir, batch_size=batch, sequence_length=context), batch, context)
    model = model.at(Precision(*run_as)) if run_as != ("float32", "as-stored") else model
    position = {b: i for i, b in enumerate(model.block_index)}
    rows = []
    for i, (node_id, blocks) in enumerate(pipeline_stages(plan, config.get_text_config().num_hidden_layers)):
        shard = shards_dir / node_id / SHARD_FILE
        if not shard.is_file():
            raise VerifyError(f"node '{node_id}': no shard at '{shard}'")
        p = position[blocks[0]] if blocks[1] > blocks[0] else 0
        e = position[blocks[1] - 1] + 1 if blocks[1] > blocks[0] else 0
        where = f"stage {i} (node '{node_id}', blocks [{blocks[0]}, {blocks[1]}))"
        # A fresh process per stage, as on its node: no other test's or stage's threads, heap or caches.
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            measured = pool.submit(_stage_peak, str(model_dir), str(shards_dir / node_id), blocks, batch, context,
                                   run_as, where).result()
        rows.append(StageMemory(i, node_id, blocks, model.stage_memory(p, e), model.stage_kv(p, e), measured))
    return rows


def _stage_peak(model_dir: str, node_dir: str, blocks: tuple[int, int], batch: int, context: int,
                run_as: tuple[str, str], where: str) -> int:
    """In a child process: the stage's loaded weights plus the peak RSS growth while it runs (bytes)."""
    import torch
    from transformers import DynamicCache

    from williw import stages as st
    from williw.progress import quiet_transformers
    from williw.quantize import quantize_linears
    from williw.shards.reader import ShardReader
    from williw.verify import SHARD_FILE

    dtype, weight_format = run_as
    with quiet_transformers():
        config = st.load_config(Path(model_dir))
        _, cls = st.model_class(config)
        text = config.get_text_config()
        torch_dtype = getattr(torch, dtype)
        shard = Path(node_dir) / SHARD_FILE
        with ShardReader(shard) as f:
            state = f.read_all()
        stage = st.build_stage(st.load_config(Path(node_dir)), cls, blocks, state, torch_dtype, where=where,
                               source=f"shard '{shard}'")
        del state
        quantize_linears([stage.stack[i] for i in range(*blocks)], weight_format)
        _trim()
        weights = sum(t.numel() * t.element_size() for t in (*stage.model.parameters(), *stage.model.buffers())
                      if t.device.type != "meta")
        x: Any = torch.randint(0, text.vocab_size, (batch, context)) if stage.is_first else \
            torch.zeros((batch, context, text.hidden_size), dtype=torch_dtype)
        # Warm-up: one-time buffers are not the stage's.
        st.run_stage(stage, x[:, :8], cache=DynamicCache(config=config))
        _trim()
        before = _status("VmRSS")
        _reset_peak()
        cache = DynamicCache(config=config)
        st.run_stage(stage, x, cache=cache)
        return weights + _status("VmHWM") - before
