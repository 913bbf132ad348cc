"""Benchmark the precisions a node can run its stage in, on the generated 1.1B Llama (bench/_models.py), in one
process at a fixed thread count: for each of float32, bfloat16, int8 and int4 (weight-only, bfloat16 compute;
`williw.quantize`), the model's weight bytes in memory, the peak RSS while it loads and runs, and prefill and
greedy decode tokens/s (its own DynamicCache, ``logits_to_keep=1``), float32 being the reference measured in the
same run. Also the planner's byte count for the same format (`williw.precision.linear_weight_bytes` over the
metadata's tensors) beside the measured bytes.

    .venv/bin/python bench/precision.py [--threads 2] [--prompt-tokens 128] [--decode-tokens 16]
        [--weights float32,bfloat16,int8,int4]

Goals (issue 30): int8 weights <= 0.3x and int4 <= 0.2x of float32's bytes; decode >= 2x float32's tokens/s in
bfloat16 and >= 3x in int8 and int4.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _planned_bytes(path: Path, weights: str, dtype: str) -> int:
    """What the planner counts: quantizable linears by `linear_weight_bytes`, everything else at ``dtype``."""
    from williw.metadata import generate_metadata
    from williw.precision import DTYPE_BYTES, linear_weight_bytes

    total = 0
    for t in generate_metadata(path).layers:
        linear = t.block is not None and len(t.shape) == 2 and t.layer_type in ("attention", "mlp")
        numel = 1
        for s in t.shape:
            numel *= s
        total += linear_weight_bytes(tuple(t.shape), weights, dtype) if linear and weights != "as-stored" \
            else numel * DTYPE_BYTES[dtype]
    return total


def measure(path: Path, label: str, prompt: int, decode: int) -> dict:
    import torch
    import transformers

    from williw.progress import quiet_transformers
    from williw.quantize import quantize_linears
    from williw.stages import block_stack

    weights = label if label in ("int8", "int4") else "as-stored"
    dtype = "bfloat16" if label != "float32" else "float32"
    gc.collect()
    before = _rss()
    peak = before
    with quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    quantize_linears(list(block_stack(model)[1]), weights)
    gc.collect()
    held = _model_bytes(model)
    peak = max(peak, _rss())
    ids = torch.arange(1, prompt + 1).unsqueeze(0) % model.config.vocab_size
    best_prefill = best_decode = float("inf")
    tokens = []
    with torch.no_grad():
        for _ in range(2):
            cache = transformers.DynamicCache(config=model.config)
            t0 = time.perf_counter()
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            t1 = time.perf_counter()
            tokens = [int(out.logits[0, -1].argmax())]
            for _ in range(decode - 1):
                out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True, logits_to_keep=1)
                tokens.append(int(out.logits[0, -1].argmax()))
            t2 = time.perf_counter()
            best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
            peak = max(peak, _rss())
    del model, out, cache
    gc.collect()
    return {"label": label, "bytes": held, "planned": _planned_bytes(path, weights, dtype), "peak": peak - before,
            "prefill": prompt / best_prefill, "decode": (decode - 1) / best_decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--weights", default="float32,bfloat16,int8,int4")
    args = ap.parse_args()
    import torch

    from _models import llama_1b

    torch.set_num_threads(args.threads)
    path = llama_1b()
    rows = [measure(path, w, args.prompt_tokens, args.decode_tokens) for w in args.weights.split(",")]
    ref = next((r for r in rows if r["label"] == "float32"), rows[0])
    print(f"generated Llama 1.1B, {args.threads} threads, prompt {args.prompt_tokens} tokens, "
          f"{args.decode_tokens} greedy tokens, best of 2; cpu capability {torch.backends.cpu.get_cpu_capability()}"
          f", load average {os.getloadavg()[0]:.1f}")
    head = f"{'precision':10} {'weights MB':>11} {'x f32':>6} {'planned MB':>11} {'peak RSS MB':>12} " \
           f"{'prefill tok/s':>14} {'decode tok/s':>13} {'x f32':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['label']:10} {r['bytes'] / 1e6:11.1f} {r['bytes'] / ref['bytes']:6.2f} {r['planned'] / 1e6:11.1f} "
              f"{r['peak'] / 1e6:12.1f} {r['prefill']:14.1f} {r['decode']:13.2f} {r['decode'] / ref['decode']:6.2f}")


if __name__ == "__main__":
    main()
