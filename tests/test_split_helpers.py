"""Plans and byte checks shared by the splitter tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from williw.checkpoint import open_checkpoint
from williw.metadata import generate_metadata
from williw.planner import pipeline_from_cuts
from williw.planner.plan import NodeAssignment, Plan


def pipeline_plan(model_dir: Path, stages: int = 3) -> Plan:
    """Contiguous blocks per node; embeddings on stage 0, final norm and head on the last; a tied LM head's
    embedding replicated on the last stage."""
    meta = generate_metadata(model_dir)
    n = len(meta.blocks)
    return pipeline_from_cuts(meta, [round(i * n / stages) for i in range(1, stages)], model_name="test/model")


def greedy_plan(model_dir: Path, nodes: int = 3) -> Plan:
    """Tensors dealt round-robin in reverse order, so every shard interleaves every source file."""
    names = [t.name for t in open_checkpoint(model_dir).tensors][::-1]
    return Plan("greedy", tuple(NodeAssignment(f"node_{i:03d}", tuple(names[i::nodes]), 1.0, 0.5)
                                for i in range(nodes)))


def raw_tensors(path: Path) -> dict[str, bytes]:
    """Each tensor's bytes straight from a safetensors file, without any library."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return {k: data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]] for k, v in header.items()}


def source_raw(model_dir: Path) -> dict[str, bytes]:
    """Each tensor's bytes from a model folder: raw for safetensors, storage bytes for torch files."""
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        out: dict[str, bytes] = {}
        for f in files:
            out.update(raw_tensors(f))
        return out
    import torch

    out = {}
    for f in sorted(model_dir.glob("*.bin")):
        for k, v in torch.load(f, weights_only=True).items():
            out[k] = v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return out


def write_sharded_model(path: Path, files: int, tensors_per_file: int, rows: int, cols: int) -> Path:
    """A Llama-named model of ``files`` safetensors files with an index, each holding ``tensors_per_file`` random
    F16 ``[rows, cols]`` tensors (numpy's fixed seed 0, so every run writes the same bytes)."""
    import numpy as np

    from williw.header import serialize_header

    rng = np.random.default_rng(0)
    weight_map = {}
    for f in range(files):
        file = f"model-{f + 1:05d}-of-{files:05d}.safetensors"
        names = [f"model.layers.{f * tensors_per_file + i}.mlp.up_proj.weight" for i in range(tensors_per_file)]
        prefix, _ = serialize_header([(n, "F16", (rows, cols)) for n in names], {"format": "pt"})
        with open(path / file, "wb") as out:
            out.write(prefix)
            for n in names:
                out.write(rng.bytes(rows * cols * 2))
                weight_map[n] = file
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return path
