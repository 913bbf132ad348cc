"""The model as the planner sees it, and the two cost functions.

A pipeline stage holds the blocks ``[p, e)`` (positions in ``ModelMetadata.blocks``), plus the first group
(embeddings) when ``p == 0`` and the last group (final norm, LM head, the tied head's compute) when ``e == n``.
With a tied LM head and more than one stage, the last stage also holds a replica of the embedding matrix.

Costs (seconds), one function of the stage's totals each:
  * prefill: ``GFLOPs / (TFLOPS · 1000)`` — compute-bound, one forward pass over ``B·S`` tokens;
  * decode: ``bytes / (GB/s · 1e9)`` — one token reads every weight of the stage once, so it is
    memory-bandwidth-bound (the roofline argument: a matrix-vector product does 2 FLOPs per 2-byte weight,
    far below the ~150 FLOPs/byte an A100 needs to be compute-bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

from williw.fleet import GB, TFLOPS_IN_GFLOPS, Node
from williw.metadata import ModelMetadata

OBJECTIVES = ("prefill", "decode")


@dataclass(frozen=True)
class PipelineModel:
    """Blocks in model order with prefix sums, and the fixed extras of the first and last stage."""

    block_index: tuple[int, ...]  # the metadata block index at each position
    block_compute: tuple[float, ...]  # GFLOPs
    block_bytes: tuple[int, ...]
    prefix_compute: tuple[float, ...]  # len n + 1
    prefix_bytes: tuple[int, ...]
    block_names: tuple[tuple[str, ...], ...]
    first_names: tuple[str, ...]
    first_compute: float
    first_bytes: int
    last_names: tuple[str, ...]
    last_compute: float  # includes the tied head's compute
    last_bytes: int
    replica: str | None  # the tied head's tensor, held again by the last stage when it is not stage 0
    replica_bytes: int
    tokens: int  # B · S of the metadata's forward pass

    @property
    def n(self) -> int:
        return len(self.block_index)

    def stage_compute(self, p: int, e: int) -> float:
        """GFLOPs of the stage ``[p, e)``, summed in model order (so the figure does not depend on the search)."""
        parts = list(self.block_compute[p:e])
        if p == 0:
            parts.insert(0, self.first_compute)
        if e == self.n:
            parts.append(self.last_compute)
        return math.fsum(parts)

    def stage_bytes(self, p: int, e: int) -> int:
        b = self.prefix_bytes[e] - self.prefix_bytes[p]
        if p == 0:
            b += self.first_bytes
        if e == self.n:
            b += self.last_bytes + (self.replica_bytes if p > 0 else 0)
        return b

    def stage_names(self, p: int, e: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(owned tensors in model order, replicas) of the stage ``[p, e)``."""
        names: list[str] = list(self.first_names) if p == 0 else []
        for i in range(p, e):
            names.extend(self.block_names[i])
        shared: tuple[str, ...] = ()
        if e == self.n:
            names.extend(self.last_names)
            if p > 0 and self.replica:
                shared = (self.replica,)
        return tuple(names), shared


def pipeline_model(meta: ModelMetadata) -> PipelineModel:
    """Group the metadata's tensors into first group, blocks and last group."""
    blocks = sorted(meta.blocks, key=lambda b: b.index)
    position = {b.index: i for i, b in enumerate(blocks)}
    block_names: list[list[str]] = [[] for _ in blocks]
    first: list[str] = []
    last: list[str] = []
    first_compute: list[float] = []
    last_compute: list[float] = []
    first_bytes = last_bytes = 0
    for x in meta.layers:
        if x.placement == "block" and x.block in position:
            block_names[position[x.block]].append(x.name)
        elif x.placement == "first":
            first.append(x.name)
            first_compute.append(x.compute_required)
            first_bytes += x.bytes
        else:
            last.append(x.name)
            last_compute.append(x.compute_required)
            last_bytes += x.bytes
    tied = meta.tied_lm_head
    if tied:
        last_compute.append(tied.compute_required)
    compute = tuple(b.compute for b in blocks)
    nbytes = tuple(b.bytes for b in blocks)
    return PipelineModel(
        block_index=tuple(b.index for b in blocks), block_compute=compute, block_bytes=nbytes,
        prefix_compute=tuple(accumulate(compute, initial=0.0)), prefix_bytes=tuple(accumulate(nbytes, initial=0)),
        block_names=tuple(tuple(x) for x in block_names), first_names=tuple(first),
        first_compute=math.fsum(first_compute), first_bytes=first_bytes, last_names=tuple(last),
        last_compute=math.fsum(last_compute), last_bytes=last_bytes, replica=tied.tensor if tied else None,
        replica_bytes=tied.bytes if tied else 0, tokens=meta.batch_size * meta.sequence_length)


def prefill_time(gflops: float, node: Node) -> float:
    """Seconds for ``gflops`` on ``node``: GFLOPs / (TFLOPS · 1000)."""
    return gflops / (node.compute_tflops * TFLOPS_IN_GFLOPS)


def decode_time(nbytes: float, node: Node) -> float | None:
    """Seconds to read ``nbytes`` once at the node's memory bandwidth; None when the node gives none."""
    if node.memory_bandwidth_gbps is None:
        return None
    return nbytes / (node.memory_bandwidth_gbps * GB)
