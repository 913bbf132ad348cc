"""Planner benchmarks with run-time memory and the network (issue 17), one table each.

1. A home cluster shaped like prima.cpp's device table (Li et al. 2025, "PRIMA.CPP", table 3: Mac M1 laptop,
   Linux laptop, a desktop with an RTX 2080 Ti, two phone-class nodes) planning a 70B-shaped Llama in 4-bit
   (metadata built from the config's shapes, no weights): per objective the plan and the largest context its
   stages hold at run time, against the plan made from weights only (the reference: what the planner did before
   run-time memory; a max context below the asked one is a plan that runs out of memory).
2. A 24-node cluster shaped like Helix's machine profiles (Mei et al. 2025, "Helix", section 6.1: 4 A100,
   8 L4, 12 T4; 10 Gb/s links, one region 50 ms away) planning a 70B Llama in fp16 at context 4,096.
3. Exact planning with network costs over 12 candidate nodes (target: under 1 s), against the same search
   without network costs in the same run.

Node figures are spec-sheet values (TFLOPS fp16 dense, GB, GB/s), rounded; the phones' and laptops' from the
devices' published specifications. Disk (prima.cpp's mmap offloading) is not modelled: a plan must fit memory.

Run: ``.venv/bin/python bench/planner_runtime.py``
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from planner import print_table  # noqa: E402 - bench/planner.py's table, run from this folder
from williw.errors import InfeasiblePlan  # noqa: E402
from williw.fleet import Node  # noqa: E402
from williw.memory import block_memory  # noqa: E402
from williw.metadata import BlockMeta, LayerMeta, ModelMetadata  # noqa: E402
from williw.planner import make_plan  # noqa: E402
from williw.planner.capacity import max_context  # noqa: E402
from williw.planner.costs import pipeline_model  # noqa: E402
from williw.planner.pipeline import Stage  # noqa: E402

LLAMA_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16"}


def llama_70b(bits: int, seq: int = 512) -> ModelMetadata:
    """The 70B Llama's tensors as metadata: weights at ``bits`` per parameter, compute for ``seq`` tokens."""
    cfg = LLAMA_70B
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv_dim = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    params = 2 * h * h + 2 * h * kv_dim + 3 * h * f + 2 * h
    nbytes = params * bits // 8
    mem = block_memory(cfg, None, attention=True, a_log=None, hidden=h)
    flops = (2 * seq * params + 4 * seq * seq * h) / 1e9
    layers = [LayerMeta("model.embed_tokens.weight", (v, h), "BF16", v * h, 2 * v * h, 0.0, "embedding", None,
                        "first", "")]
    blocks = []
    for i in range(cfg["num_hidden_layers"]):
        layers.append(LayerMeta(f"model.layers.{i}.w", (params,), "BF16", params, nbytes, flops, "mlp", i, "block",
                                ""))
        blocks.append(BlockMeta(i, 1, params, nbytes, flops, 4 * seq * seq * h / 1e9,
                                kv_bytes_per_token=mem.kv_bytes_per_token,
                                activation_bytes_per_token=mem.activation_bytes_per_token))
    layers.append(LayerMeta("lm_head.weight", (v, h), "BF16", v * h, v * h * bits // 8, 2 * seq * v * h / 1e9,
                            "lm_head", None, "last", ""))
    total = sum(x.compute_required for x in layers)
    return ModelMetadata(1, f"llama-70b-{bits}bit", "llama", "LlamaForCausalLM", "safetensors", 1, seq, h,
                         tuple(layers), tuple(blocks), None, total, sum(x.num_params for x in layers),
                         sum(x.bytes for x in layers), len(layers), element_bytes=2)


def weights_only(meta: ModelMetadata) -> ModelMetadata:
    blocks = tuple(BlockMeta(b.index, b.tensors, b.params, b.bytes, b.compute, b.attention_compute)
                   for b in meta.blocks)
    return ModelMetadata(**{**meta.__dict__, "blocks": blocks})


# prima.cpp's home cluster, shaped: (id, TFLOPS, memory GB, memory GB/s, network GB/s, latency ms)
HOME = [("mac-m1", 2.6, 8, 68, 0.06, 2.0), ("laptop-i9", 1.0, 32, 51, 0.06, 2.0),
        ("desktop-2080ti", 26.9, 11, 616, 0.12, 1.0), ("desktop-ram", 1.5, 32, 51, 0.12, 1.0),
        ("phone-a", 1.0, 8, 34, 0.03, 5.0), ("phone-b", 1.0, 8, 34, 0.03, 5.0)]


def fleet(rows, reserve_gb: float = 0.0) -> list[Node]:
    return [Node(i, t, m, bw, network_gbps=net, latency_ms=lat, memory_reserve_gb=reserve_gb)
            for i, t, m, bw, net, lat in rows]


def _ctx(plan) -> str:
    most = plan.extra.get("max_context_length")
    return "any" if most is None else f"{most:,}"


def _at_run_time(plan, meta: ModelMetadata, nodes: list[Node], context: int) -> str:
    """The largest context a plan's stages hold under the run-time memory model (blocks are positions here)."""
    model = pipeline_model(meta, 1, context)
    fleet_ = {v.node_id: v for v in nodes}
    stages = [Stage(0, a.blocks[0], a.blocks[1]) for a in plan.assignments]
    most = max_context(model, stages, [fleet_[a.node_id] for a in plan.assignments], 1)
    return "any" if most is None else f"{most:,}"


def home() -> None:
    meta = llama_70b(4)
    nodes = fleet(HOME, reserve_gb=0.5)
    rows = []
    for objective, context in (("prefill", 512), ("decode", 4096), ("latency", 4096), ("decode", 16384)):
        for label, m in (("run-time memory", meta), ("weights only (before)", weights_only(meta))):
            try:
                (plan, secs) = timed(lambda m=m, o=objective, c=context: make_plan(m, nodes, objective=o,
                                                                               context_length=c))
            except InfeasiblePlan as exc:
                rows.append((objective, f"{context:,}", label, "refused", "-", "-", str(exc)[:80]))
                continue
            stages = " → ".join(f"{a.node_id}[{a.blocks[0]},{a.blocks[1]})" for a in plan.assignments)
            rows.append((objective, f"{context:,}", label, f"{plan.bottleneck_s * 1e3:.1f} ms",
                         _at_run_time(plan, meta, nodes, context),
                         f"{secs:.2f} s", stages))
    print_table(f"Home cluster (prima.cpp-shaped, 6 nodes, 0.5 GB reserve each), {meta.model_name} "
                f"({meta.total_bytes / 1e9:.1f} GB)",
                ["objective", "context", "memory model", "cost", "max context at run time", "plan time",
                 "stages"], rows)


def helix() -> None:
    meta = llama_70b(16)
    rows = [(f"a100-{i}", 312.0, 80, 2039, 1.25, 1.0) for i in range(4)]
    rows += [(f"l4-{i}", 121.0, 24, 300, 1.25, 1.0 if i < 4 else 50.0) for i in range(8)]
    rows += [(f"t4-{i}", 65.0, 16, 320, 1.25, 1.0 if i < 6 else 50.0) for i in range(12)]
    nodes = fleet(rows, reserve_gb=1.0)
    out = []
    for objective in ("prefill", "decode"):
        plan, secs = timed(lambda o=objective: make_plan(meta, nodes, objective=o, context_length=4096,
                                                        time_limit_s=10.0))
        gap = plan.extra.get("gap_to_lower_bound")
        out.append((objective, len(plan.assignments), f"{plan.bottleneck_s * 1e3:.2f} ms",
                    "exact" if plan.exact else f"gap {gap * 100:.2f}%" if gap is not None else "-", _ctx(plan),
                    plan.extra.get("max_batch_size"), f"{secs:.2f} s"))
    print_table(f"Helix-shaped cluster (4 A100, 8 L4, 12 T4; 10 Gb/s, 10 nodes 50 ms away), {meta.model_name} "
                f"at context 4,096", ["objective", "stages", "bottleneck", "proof", "max context",
                                      "max batch at 4,096", "plan time"], out)


def exact_with_network() -> None:
    rng = random.Random(0)
    meta = llama_70b(4)
    rows = []
    base = [(f"n{i}", round(10 ** rng.uniform(0, 2.5), 2), round(rng.uniform(4, 24), 1), round(rng.uniform(50, 1000)),
             round(rng.uniform(0.01, 2), 3), round(rng.uniform(0.2, 20), 1)) for i in range(12)]
    for network in (True, False):  # the same 12 nodes, with and without their links
        nodes = [Node(i, t, m, bw, network_gbps=net if network else None, latency_ms=lat if network else None)
                 for i, t, m, bw, net, lat in base]
        for objective in ("prefill", "decode"):
            plan, secs = timed(lambda o=objective, v=nodes: make_plan(meta, v, objective=o, context_length=2048))
            rows.append(("with network" if network else "without (reference)", objective,
                         len(plan.assignments), plan.exact, f"{plan.bottleneck_s * 1e3:.2f} ms", _ctx(plan),
                         f"{secs:.3f} s"))
    print_table(f"Exact search over 12 candidates, {meta.model_name} (80 blocks), context 2,048 (target < 1 s)",
                ["costs", "objective", "stages", "exact", "bottleneck", "max context", "plan time"], rows)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


if __name__ == "__main__":
    home()
    helix()
    exact_with_network()
