"""The benchmarks' model: a generated Llama of about 1.1B parameters in bfloat16 (TinyLlama's shape), sharded
safetensors, written straight from numpy in bounded chunks (no torch, so generating it costs no RAM).

hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000: 1,100,048,384 parameters, 2.2 GB.
Weights are N(0, 0.02) rounded to bfloat16, norms are ones, so the model computes finite logits.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from williw.header import serialize_header  # noqa: E402

CACHE = Path(os.environ.get("WILLIW_BENCH_CACHE", ROOT / ".cache"))
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)
SHARD_BYTES = 1_000_000_000
# Llama-3-70B's shape (meta-llama/Meta-Llama-3-70B config.json): 70,553,706,496 parameters, 141.1 GB in bfloat16.
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256)


def llama_tensors(hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                  num_key_value_heads: int, vocab_size: int) -> list[tuple[str, tuple[int, ...]]]:
    kv = hidden_size // num_attention_heads * num_key_value_heads
    out = [("model.embed_tokens.weight", (vocab_size, hidden_size))]
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (hidden_size, hidden_size)),
                (p + "self_attn.k_proj.weight", (kv, hidden_size)),
                (p + "self_attn.v_proj.weight", (kv, hidden_size)),
                (p + "self_attn.o_proj.weight", (hidden_size, hidden_size)),
                (p + "mlp.gate_proj.weight", (intermediate_size, hidden_size)),
                (p + "mlp.up_proj.weight", (intermediate_size, hidden_size)),
                (p + "mlp.down_proj.weight", (hidden_size, intermediate_size)),
                (p + "input_layernorm.weight", (hidden_size,)),
                (p + "post_attention_layernorm.weight", (hidden_size,))]
    out += [("model.norm.weight", (hidden_size,)), ("lm_head.weight", (vocab_size, hidden_size))]
    return out


def _bf16_chunks(shape: tuple[int, ...], rng: np.random.Generator, chunk: int = 1 << 24):
    n = int(np.prod(shape))
    if len(shape) == 1:  # norm weights: 1.0 in bfloat16 is 0x3F80
        yield np.full(n, 0x3F80, dtype="<u2").tobytes()
        return
    for start in range(0, n, chunk):
        x = rng.standard_normal(min(chunk, n - start), dtype=np.float32) * np.float32(0.02)
        yield (x.view("<u4") >> 16).astype("<u2").tobytes()  # truncate float32 to bfloat16


def _groups(tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def generate_llama(path: Path, dims: dict[str, int] = LLAMA_1B, shard_bytes: int = SHARD_BYTES,
                   sparse: bool = False) -> Path:
    """Write the model once; later calls return the cached folder. ``sparse``: real headers over holes (the files
    have their full size but take no disk; every weight reads as 0)."""
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors = llama_tensors(**dims)
    shards = _groups(tensors, shard_bytes)
    weight_map = {}
    for i, group in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        prefix, _ = serialize_header([(n, "BF16", s) for n, s in group], {"format": "pt"})
        with open(tmp / file, "wb") as f:
            f.write(prefix)
            for name, shape in group:
                for block in () if sparse else _bf16_chunks(shape, rng):
                    f.write(block)
                weight_map[name] = file
            if sparse:
                f.truncate(len(prefix) + sum(int(np.prod(s)) * 2 for _, s in group))
    total = sum(int(np.prod(s)) * 2 for _, s in tensors)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
              "mlp_bias": False, **dims}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(path)
    return path


def llama_1b() -> Path:
    """The 1.1B bf16 Llama used by every benchmark (about 2.2 GB under bench/.cache)."""
    return generate_llama(CACHE / "llama-1.1b-bf16")


def llama_70b_sparse(files: int = 30) -> Path:
    """Llama-3-70B's shape in ``files`` shard files of sparse holes (141 GB apparent, a few MB on disk)."""
    tensors = llama_tensors(**LLAMA_70B)
    shard_bytes = sum(int(np.prod(s)) * 2 for _, s in tensors) // files
    while len(_groups(tensors, shard_bytes)) > files:  # the largest shard size that makes exactly ``files``
        shard_bytes += 10_000_000
    return generate_llama(CACHE / f"llama-70b-sparse-{files}", LLAMA_70B, shard_bytes=shard_bytes, sparse=True)


if __name__ == "__main__":
    print(llama_1b())
