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
