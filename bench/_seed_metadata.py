"""The seed's metadata script, transcribed as a reference: load the whole model with transformers, walk its
state_dict, price every tensor as a matmul. Only for benchmarks.

Usage: python bench/_seed_metadata.py MODEL_DIR OUT.json [--in-process-timing]
"""

from __future__ import annotations

import json
import resource
import sys
import time


def seed_metadata(model_path: str, batch_size: int = 1, sequence_length: int = 512) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    layers = []
    for name, param in model.state_dict().items():
        num_params = param.numel()
        layer_type = ("attention" if "attn" in name else "mlp" if "mlp" in name else
                      "embedding" if "embed" in name else "norm" if "norm" in name else "other")
        layers.append({"name": name, "shape": list(param.shape), "num_params": num_params,
                       "compute_required": 2 * num_params * batch_size * sequence_length / 1e9,
                       "layer_type": layer_type, "dtype": str(param.dtype)})
    return {"model_name": model_path, "model_type": "transformer", "batch_size": batch_size,
            "sequence_length": sequence_length, "layers": layers,
            "total_compute": sum(x["compute_required"] for x in layers), "total_layers": len(layers)}


if __name__ == "__main__":
    start = time.perf_counter()
    meta = seed_metadata(sys.argv[1])
    elapsed = time.perf_counter() - start
    with open(sys.argv[2], "w") as f:
        json.dump(meta, f)
    if "--in-process-timing" in sys.argv:
        print(json.dumps({"seconds": elapsed, "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
