"""The model as the planner sees it, and the cost functions every search shares.

A pipeline stage holds the blocks ``[p, e)`` (positions in ``ModelMetadata.blocks``), plus the first group
(embeddings) when ``p == 0`` and the last group (final norm, LM head, the tied head's compute) when ``e == n``.
With a tied LM head and more than one stage, the last stage also holds a replica of the embedding matrix.

Workload: ``B`` sequences (``batch_size``) of up to ``C`` tokens of context (``context_length``), prefilled ``S``
tokens per forward pass (the metadata's ``sequence_length``; its compute is priced for ``B·S`` tokens).

Memory of a stage (bytes) = weights + KV cache + activations, which must fit ``memory - reserve`` of its node, all
at the precision the node runs the stage in (`williw.precision.Precision`; this module is the one home of the rule,
`PipelineModel.at` prices a model at a precision and every search, bound, check and report reads it from there):
  * weights: a tensor the quantizer converts (`williw.metadata.LayerMeta.quantizable`) takes
    `williw.precision.linear_weight_bytes` in the stage's format; every other tensor stored in a float dtype takes
    ``numel × DTYPE_BYTES[dtype]`` of the compute dtype (the stage casts it); tensors stored in other dtypes
    (integers, packed quantized weights, FP8) stay as stored (`tensor_bytes`);
  * KV cache: ``Σ_blocks B · (kv_bytes_per_token · min(C, window) + state_bytes)`` (`williw.memory`);
  * activations: the largest transient of one of its blocks at ``B·S`` tokens (blocks run one after the other, so
    transients do not add up), and on the last stage the logits, ``B·S·vocab·e`` bytes;
  * KV cache and activations are at the compute dtype: the metadata's figures (at its ``compute_dtype``) times
    ``DTYPE_BYTES[dtype] / element_bytes``; metadata that names no ``compute_dtype`` keeps them as written.
Without a precision (`pipeline_model`'s default) a model is priced as the metadata writes it: bytes as stored.

Costs (seconds) of a stage on a node:
  * prefill: ``GFLOPs / (TFLOPS · 1000)`` — compute-bound, one forward pass over ``B·S`` tokens;
  * decode: ``bytes / (GB/s · 1e9)`` with bytes = weights + KV cache at the stage's precision — one token reads
    every weight of the stage and its whole cache once, so it is memory-bandwidth-bound (the roofline argument: a
    matrix-vector product does 2 FLOPs per 2-byte weight, far below the ~150 FLOPs/byte an A100 needs to be
    compute-bound);
  * plus the stage's transfers, each ``latency_ms / 1000 + bytes / (network_gbps · 1e9)`` on the node's own link:
    receiving its input and sending its output. Between stages the hidden state travels, ``B·S·hidden·e`` bytes
    for prefill and ``B·hidden·e`` per decoded token; the first stage receives token ids from the client and the
    last sends token ids back (8 bytes each: ``B·S·8``, ``B·8``). A node without ``network_gbps`` and
    ``latency_ms`` transfers for free. Both ends of a hop pay for it, as both links are busy while it runs.
  * a hop between two nodes that the fleet's link table lists (`williw.fleet.Link`) is priced on the pair's link
    instead, for both ends (the sender's send and the receiver's receive): ``latency_ms / 1000 + bytes /
    (network_gbps · 1e9)`` of the pair, a field the link leaves out taken from that end's own link. Hops between
    unlisted pairs and the hops to and from the client keep the own-link pricing, so without a link table every
    cost is the one above. With links a stage's cost depends on its neighbours (`williw.planner.links`).

Objectives: ``prefill`` and ``decode`` minimise the slowest stage (the pipeline's throughput); ``latency`` the
sum of the stages' decode costs (one request's time per token: the cost model of exo#957).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from williw.fleet import GB, TFLOPS_IN_GFLOPS, Link, Node
from williw.memory import BlockMemory
from williw.metadata import LayerMeta, ModelMetadata
from williw.precision import DTYPE_BYTES, Precision, linear_weight_bytes

OBJECTIVES = ("prefill", "decode", "latency")
TOKEN_ID_BYTES = 8  # int64 token ids between the client and the first and last stage


@dataclass(frozen=True)
class PipelineModel:
    """Blocks in model order with prefix sums, and the fixed extras of the first and last stage."""

    block_index: tuple[int, ...]  # the metadata block index at each position
    block_compute: tuple[float, ...]  # GFLOPs
    block_bytes: tuple[int, ...]  # weights
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
    batch_size: int = 1
    context_length: int = 0
    block_kv: tuple[int, ...] = ()  # KV cache and state bytes at (B, C)
    prefix_mem: tuple[int, ...] = ()  # prefix sums of weights + KV cache
    block_act: tuple[int, ...] = ()  # largest transient at B·S tokens
    last_act: int = 0  # the logits
    hop_bytes: tuple[int, int] = (0, 0)  # hidden state between stages: (prefill, one decoded token)
    token_bytes: tuple[int, int] = (0, 0)  # token ids from and to the client: (prefill, one decoded token)
    act_table: tuple[tuple[int, ...], ...] = ()  # sparse table of range maxima over block_act
    block_runtime: tuple[BlockMemory, ...] = ()  # per block: KV per token, window, state, activation per token
    prefill_tokens: int = 0  # S: tokens per sequence of one forward pass
    precision: Precision | None = None  # what the bytes are priced at; None: as the metadata writes them
    meta: ModelMetadata | None = dataclasses.field(default=None, compare=False, repr=False)
    # `at`'s models, by (precision, batch, context); shared by the copies `dataclasses.replace` makes of this one
    priced: dict[Any, PipelineModel] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def n(self) -> int:
        return len(self.block_index)

    def at(self, precision: Precision | None) -> PipelineModel:
        """The same model and workload priced at ``precision`` (None: as the metadata writes it)."""
        if precision == self.precision or self.meta is None:
            return self
        key = (precision, self.batch_size, self.context_length)
        if key not in self.priced:
            self.priced[key] = pipeline_model(self.meta, self.batch_size, self.context_length, precision)
        return self.priced[key]

    def stage_compute(self, p: int, e: int) -> float:
        """GFLOPs of the stage ``[p, e)``, summed in model order (so the figure does not depend on the search)."""
        parts = list(self.block_compute[p:e])
        if p == 0:
            parts.insert(0, self.first_compute)
        if e == self.n:
            parts.append(self.last_compute)
        return math.fsum(parts)

    def stage_bytes(self, p: int, e: int) -> int:
        """Weight bytes of the stage ``[p, e)`` (its shard)."""
        b = self.prefix_bytes[e] - self.prefix_bytes[p]
        if p == 0:
            b += self.first_bytes
        if e == self.n:
            b += self.last_bytes + (self.replica_bytes if p > 0 else 0)
        return b

    def stage_kv(self, p: int, e: int) -> int:
        """KV cache and state bytes of the stage ``[p, e)`` at the model's batch and context."""
        return self.prefix_mem[e] - self.prefix_mem[p] - (self.prefix_bytes[e] - self.prefix_bytes[p])

    def stage_activation(self, p: int, e: int, last: bool | None = None) -> int:
        """The stage's largest transient: its blocks' (a range maximum, O(1)) and the logits on the last stage."""
        a = 0
        if e > p:
            j = (e - p).bit_length() - 1
            row = self.act_table[j]
            a = max(row[p], row[e - (1 << j)])
        return max(a, self.last_act) if (e == self.n if last is None else last) else a

    def stage_memory(self, p: int, e: int) -> int:
        """Weights + KV cache + activations of the stage ``[p, e)``: what must fit ``memory - reserve``."""
        return self.stage_bytes(p, e) + self.stage_kv(p, e) + self.stage_activation(p, e)

    def stage_read_bytes(self, p: int, e: int) -> int:
        """Bytes one decoded token reads: the stage's weights and its whole KV cache."""
        return self.stage_bytes(p, e) + self.stage_kv(p, e)

    def transfer_bytes(self, p: int, e: int, decode: bool) -> tuple[int, int]:
        """(received, sent) bytes of the stage ``[p, e)`` for one prefill (``decode`` False) or one token."""
        i = 1 if decode else 0
        return (self.token_bytes[i] if p == 0 else self.hop_bytes[i],
                self.token_bytes[i] if e == self.n else self.hop_bytes[i])

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


_STORED_ELEMENT = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # float dtypes a stage casts to its compute dtype


def tensor_bytes(x: LayerMeta, precision: Precision | None) -> int:
    """Bytes of one tensor on a node that runs it at ``precision`` (None: as stored); see the module docstring."""
    if precision is None:
        return x.bytes
    if x.quantizable and x.placement == "block" and precision.weights != "as-stored":  # the runtime converts blocks
        return linear_weight_bytes(x.shape, precision.weights, precision.dtype)
    stored = _STORED_ELEMENT.get(x.dtype)
    return x.bytes if stored is None else x.bytes * DTYPE_BYTES[precision.dtype] // stored


def _runtime_at(meta: ModelMetadata, r: BlockMemory, precision: Precision | None) -> BlockMemory:
    """A block's KV, state and activation figures at the precision's compute dtype (as written without one)."""
    if precision is None or meta.compute_dtype is None or DTYPE_BYTES[precision.dtype] == meta.element_bytes:
        return r
    d, e = DTYPE_BYTES[precision.dtype], meta.element_bytes
    return BlockMemory(r.kv_bytes_per_token * d // e, r.kv_window, r.state_bytes * d // e,
                       r.activation_bytes_per_token * d // e)


def pipeline_model(meta: ModelMetadata, batch_size: int | None = None, context_length: int | None = None,
                   precision: Precision | None = None) -> PipelineModel:
    """Group the metadata's tensors into first group, blocks and last group, for a workload.

    Args:
        meta: the model.
        batch_size: ``B`` (default: the metadata's).
        context_length: ``C`` tokens the KV cache holds per sequence (default: the metadata's sequence length).
        precision: what a node runs it at (`williw.precision.Precision`); None: bytes as the metadata writes them.
    """
    b = batch_size or meta.batch_size
    ctx = context_length or meta.sequence_length
    blocks = sorted(meta.blocks, key=lambda x: x.index)
    position = {x.index: i for i, x in enumerate(blocks)}
    block_names: list[list[str]] = [[] for _ in blocks]
    first: list[str] = []
    last: list[str] = []
    first_compute: list[float] = []
    last_compute: list[float] = []
    first_bytes = last_bytes = 0
    vocab = 0
    for x in meta.layers:
        if x.placement == "block" and x.block in position:
            block_names[position[x.block]].append(x.name)
        elif x.placement == "first":
            first.append(x.name)
            first_compute.append(x.compute_required)
            first_bytes += tensor_bytes(x, precision)
        else:
            last.append(x.name)
            last_compute.append(x.compute_required)
            last_bytes += tensor_bytes(x, precision)
            vocab = max(vocab, x.shape[0] if x.layer_type == "lm_head" and x.shape else 0)
    tied = meta.tied_lm_head
    if tied:
        last_compute.append(tied.compute_required)
        vocab = max(vocab, next(x.shape[0] for x in meta.layers if x.name == tied.tensor))
    compute = tuple(x.compute for x in blocks)
    if precision is None:
        nbytes = tuple(x.bytes for x in blocks)
    else:
        sizes = [0] * len(blocks)
        for x in meta.layers:
            if x.placement == "block" and x.block in position:
                sizes[position[x.block]] += tensor_bytes(x, precision)
        nbytes = tuple(sizes)
    runtime = tuple(_runtime_at(meta, BlockMemory(x.kv_bytes_per_token, x.kv_window, x.state_bytes,
                                                  x.activation_bytes_per_token), precision) for x in blocks)
    kv = tuple(r.kv_bytes(b, ctx) for r in runtime)
    s, e, hidden = meta.sequence_length, meta.element_bytes, meta.hidden_size or 0
    # The logits are at the compute dtype; hidden states travel at the metadata's (the runtime casts on arrival).
    e_out = DTYPE_BYTES[precision.dtype] if precision is not None and meta.compute_dtype is not None else e
    act = [b * s * r.activation_bytes_per_token for r in runtime]
    table = [act]
    while 2 << (len(table) - 1) <= len(act):
        half = 1 << (len(table) - 1)
        prev = table[-1]
        table.append([max(prev[i], prev[i + half]) for i in range(len(prev) - half)])
    return PipelineModel(
        block_index=tuple(x.index for x in blocks), block_compute=compute, block_bytes=nbytes,
        prefix_compute=tuple(accumulate(compute, initial=0.0)), prefix_bytes=tuple(accumulate(nbytes, initial=0)),
        block_names=tuple(tuple(x) for x in block_names), first_names=tuple(first),
        first_compute=math.fsum(first_compute), first_bytes=first_bytes, last_names=tuple(last),
        last_compute=math.fsum(last_compute), last_bytes=last_bytes, replica=tied.tensor if tied else None,
        replica_bytes=_replica_bytes(meta, precision), tokens=meta.batch_size * meta.sequence_length,
        batch_size=b, context_length=ctx, block_kv=kv,
        prefix_mem=tuple(accumulate((w + k for w, k in zip(nbytes, kv, strict=True)), initial=0)),
        block_act=tuple(act), last_act=b * s * vocab * e_out if any(act) else 0,
        hop_bytes=(b * s * hidden * e, b * hidden * e), token_bytes=(b * s * TOKEN_ID_BYTES, b * TOKEN_ID_BYTES),
        act_table=tuple(tuple(r) for r in table), block_runtime=runtime, prefill_tokens=s, precision=precision,
        meta=meta)


def _replica_bytes(meta: ModelMetadata, precision: Precision | None) -> int:
    tied = meta.tied_lm_head
    if tied is None:
        return 0
    table = next(x for x in meta.layers if x.name == tied.tensor)
    return tensor_bytes(dataclasses.replace(table, bytes=tied.bytes), precision)


def usable_bytes(node: Node) -> int:
    """Memory the planner may fill: ``memory - reserve`` (never below 0)."""
    return max(0, node.memory_bytes - node.reserve_bytes)


def transfer_time(nbytes: float, node: Node, link: Link | None = None) -> float:
    """Seconds for the node's side of moving ``nbytes``: ``latency_ms / 1000 + bytes / (network_gbps · 1e9)`` of
    ``link`` (a pair's link from the fleet's table), each field the link leaves out (or all, with no link) from
    the node's own link; 0 for a missing latency, no bandwidth term without a bandwidth."""
    latency = link.latency_ms if link is not None and link.latency_ms is not None else node.latency_ms
    gbps = link.network_gbps if link is not None and link.network_gbps is not None else node.network_gbps
    t = (latency or 0.0) / 1000.0
    return t + nbytes / (gbps * GB) if gbps else t


def prefill_time(gflops: float, node: Node) -> float:
    """Seconds for ``gflops`` on ``node``: GFLOPs / (TFLOPS · 1000)."""
    return gflops / (node.compute_tflops * TFLOPS_IN_GFLOPS)


def decode_time(nbytes: float, node: Node) -> float | None:
    """Seconds to read ``nbytes`` once at the node's memory bandwidth; None when the node gives none."""
    if node.memory_bandwidth_gbps is None:
        return None
    return nbytes / (node.memory_bandwidth_gbps * GB)


def stage_transfers(model: PipelineModel, p: int, e: int, node: Node, receive: Link | None = None,
                    send: Link | None = None) -> tuple[tuple[float, float], tuple[float, float]]:
    """((receive, send) for prefill, (receive, send) per decoded token), seconds, of the stage ``[p, e)`` on
    ``node``; ``receive``/``send``: the link of the hop into and out of the stage when the table lists the pair."""
    rin, rout = model.transfer_bytes(p, e, False)
    din, dout = model.transfer_bytes(p, e, True)
    return ((transfer_time(rin, node, receive), transfer_time(rout, node, send)),
            (transfer_time(din, node, receive), transfer_time(dout, node, send)))


def stage_times(model: PipelineModel, p: int, e: int, node: Node, receive: Link | None = None,
                send: Link | None = None) -> tuple[float, float | None]:
    """(prefill, decode) seconds of the stage ``[p, e)`` on ``node``, transfers included (decode None without a
    memory bandwidth); ``receive``/``send`` as in `stage_transfers`."""
    (pin, pout), (din, dout) = stage_transfers(model, p, e, node, receive, send)
    pre = prefill_time(model.stage_compute(p, e), node) + pin + pout
    dec = decode_time(model.stage_read_bytes(p, e), node)
    return pre, None if dec is None else dec + din + dout
