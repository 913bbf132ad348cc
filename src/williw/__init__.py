"""williw: cut a Hugging Face model into per-node shards by the compute and memory of the nodes.

Importing williw never imports torch or transformers; those are loaded inside the functions that need them.
"""

from williw.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from williw.errors import (
    CheckpointError,
    HubError,
    InfeasiblePlan,
    MetadataError,
    PlanError,
    SplitError,
    VerifyError,
    WilliwError,
)
from williw.metadata import ModelMetadata, generate_metadata, load_metadata, save_metadata

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "HubError",
    "InfeasiblePlan",
    "MetadataError",
    "ModelMetadata",
    "PlanError",
    "SplitError",
    "TensorInfo",
    "VerifyError",
    "WilliwError",
    "generate_metadata",
    "load_metadata",
    "open_checkpoint",
    "save_metadata",
]
