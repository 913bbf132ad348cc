"""Shards: the byte-source interface, the one-pass streaming writer, the ``shard.json`` manifest, and the check.

What other modules use (the Hub's ``pull`` builds shards from HTTP range reads with the same writer)::

    from williw.shards import ByteSource, ShardSpec, write_shards, read_manifest, check_shards
"""

from williw.shards.check import NodeCheck, ShardCheckReport, check_shards
from williw.shards.manifest import (
    CHUNK_BYTES,
    COPIED_FILES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PTH_FILE,
    SAFETENSORS_FILE,
    ManifestTensor,
    ShardManifest,
    ShardSpec,
    WrittenShard,
    check_node_id,
    expected_manifest,
    is_complete,
    read_manifest,
    safetensors_prefix,
    sha256_file,
    shard_layout,
)
from williw.shards.sources import ByteSource, LocalFileSource, TorchSource, open_source, torch_offsets
from williw.shards.writer import write_shards

__all__ = [
    "CHUNK_BYTES", "COPIED_FILES", "FORMAT_VERSION", "MANIFEST_NAME", "PTH_FILE", "SAFETENSORS_FILE", "ByteSource",
    "LocalFileSource", "ManifestTensor", "NodeCheck", "ShardCheckReport", "ShardManifest", "ShardSpec", "TorchSource",
    "WrittenShard", "check_node_id", "check_shards", "expected_manifest", "is_complete", "open_source",
    "read_manifest", "safetensors_prefix", "sha256_file", "shard_layout", "torch_offsets", "write_shards",
]
