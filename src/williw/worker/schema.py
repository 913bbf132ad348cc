"""Tables and the migrations that create them; the database records which migrations it has run.

Migrations are plain DDL frozen at the version that introduced them, so a later migration can ``ALTER`` a
table without the first one already creating the new column (what ``metadata.create_all`` on the current
tables would do). Types are the portable subset SQLite and PostgreSQL share: TEXT, INTEGER and DOUBLE
PRECISION (SQLite gives it REAL affinity). Times are Unix seconds (float); JSON is stored as TEXT.

Migration 2 added ``assignments`` (request, node, plan version, state ``assigned → pulling → ready | failed``);
migration 3 adds re-planning: the metadata a request was planned from (``model_metadata``, shared by digest, so
a thousand requests of one model store it once), the request's automatic re-planning options, each node's shard
server URL (for peer pulls) and the ``migrations`` from one plan version to the next; migration 4 adds the node
fields the planner prices since (`williw.fleet.Node`): ``latency_ms`` and ``memory_reserve_gb``, NULL when a node
does not give them (as for the nodes registered before); migration 5 adds what a node runs its stages on and in
(`williw.devices`): ``device`` (kind), ``device_name``, ``device_memory_bytes`` (BIGINT: an 80 GB GPU's bytes
overflow PostgreSQL's 32-bit INTEGER), ``dtype`` and ``weights`` (a JSON list); NULL reads as a CPU node at
float32 with its weights as stored, what the nodes registered before were.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, Table, Text

# The tables as the current code queries them (SQLAlchemy Core; DDL comes from MIGRATIONS, not from here).
meta = MetaData()

nodes = Table(
    "nodes", meta,
    Column("node_id", Text, primary_key=True),
    Column("compute_tflops", Float, nullable=False),
    Column("memory_gb", Float, nullable=False),
    Column("memory_bandwidth_gbps", Float),
    Column("network_gbps", Float),
    Column("labels", Text, nullable=False),  # JSON list of strings
    Column("token_hash", Text, nullable=False),  # sha256 hex of the node token; the token itself is never stored
    Column("registered_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("last_heartbeat", Float, nullable=False),
    Column("serve_url", Text),  # where the node's agent serves its shards to peers; NULL: it does not (migration 3)
    Column("latency_ms", Float),  # one-way network latency, ms (migration 4)
    Column("memory_reserve_gb", Float),  # memory kept free for the runtime, GB (migration 4)
    Column("device", Text),  # cpu, cuda or mps; NULL: cpu (migration 5, as the four below)
    Column("device_name", Text),  # "NVIDIA H100 80GB HBM3", a CPU's model name
    Column("dtype", Text),  # compute dtype; NULL: float32
    Column("weights", Text),  # JSON list of accepted weight formats, highest precision first; NULL: ["as-stored"]
    Column("device_memory_bytes", BigInteger),  # the device's own memory (VRAM; RAM for cpu and mps)
)

requests = Table(
    "requests", meta,
    Column("request_id", Text, primary_key=True),
    Column("model_name", Text, nullable=False),
    Column("node_id", Text),
    Column("batch_size", Integer, nullable=False),
    Column("sequence_length", Integer, nullable=False),
    Column("status", Text, nullable=False),
    Column("reason", Text),
    Column("plan_version", Integer),  # the plan in force; NULL until the first plan
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("metadata_digest", Text),  # the model_metadata the latest plan was made from (migration 3)
    Column("auto_replan", Text),  # NULL: off; else JSON {max_slowdown, max_step_bytes} (migration 3)
)

plans = Table(
    "plans", meta,
    Column("request_id", Text, primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("plan_json", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

# One row per node of the plan a request distributes: state assigned → pulling → ready | failed (issue 7).
assignments = Table(
    "assignments", meta,
    Column("request_id", Text, primary_key=True),
    Column("node_id", Text, primary_key=True),
    Column("plan_version", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("source", Text, nullable=False),  # a serve-model URL or a Hub repo id the node pulls from
    Column("revision", Text),
    Column("shard_path", Text),
    Column("sha256", Text),
    Column("error", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

model_metadata = Table(
    "model_metadata", meta,
    Column("digest", Text, primary_key=True),  # sha256 of the canonical metadata JSON
    Column("metadata_json", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

# A request's move from the plan in force to the next version: state pulling → switched | superseded.
migrations = Table(
    "migrations", meta,
    Column("request_id", Text, primary_key=True),
    Column("to_version", Integer, primary_key=True),
    Column("from_version", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("reason", Text, nullable=False),  # why it started (nodes that left or joined, an admin's call)
    Column("schedule_json", Text, nullable=False),  # planner.migrate.MigrationSchedule.to_dict()
    Column("summary_json", Text, nullable=False),  # planner.replan.Replan.summary()
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

schema_version = Table(
    "williw_schema_version", meta,
    Column("version", Integer, primary_key=True),
    Column("name", Text, nullable=False),
    Column("applied_at", Float, nullable=False),
)

SCHEMA_VERSION_DDL = ("CREATE TABLE IF NOT EXISTS williw_schema_version (version INTEGER PRIMARY KEY, "
                      "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")

# (version, name, statements). Append only; never edit a released entry.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "nodes, requests, plans", (
        "CREATE TABLE nodes (node_id TEXT PRIMARY KEY, compute_tflops DOUBLE PRECISION NOT NULL, "
        "memory_gb DOUBLE PRECISION NOT NULL, memory_bandwidth_gbps DOUBLE PRECISION, "
        "network_gbps DOUBLE PRECISION, labels TEXT NOT NULL, token_hash TEXT NOT NULL, "
        "registered_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, "
        "last_heartbeat DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE requests (request_id TEXT PRIMARY KEY, model_name TEXT NOT NULL, node_id TEXT, "
        "batch_size INTEGER NOT NULL, sequence_length INTEGER NOT NULL, status TEXT NOT NULL, reason TEXT, "
        "plan_version INTEGER, created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE plans (request_id TEXT NOT NULL REFERENCES requests(request_id) ON DELETE CASCADE, "
        "version INTEGER NOT NULL, plan_json TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
        "PRIMARY KEY (request_id, version))",
    )),
    (2, "assignments", (
        "CREATE TABLE assignments (request_id TEXT NOT NULL REFERENCES requests(request_id) ON DELETE CASCADE, "
        "node_id TEXT NOT NULL, plan_version INTEGER NOT NULL, state TEXT NOT NULL, source TEXT NOT NULL, "
        "revision TEXT, shard_path TEXT, sha256 TEXT, error TEXT, created_at DOUBLE PRECISION NOT NULL, "
        "updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (request_id, node_id))",
        "CREATE INDEX assignments_by_node ON assignments (node_id)",
    )),
    (3, "re-planning", (
        "CREATE TABLE model_metadata (digest TEXT PRIMARY KEY, metadata_json TEXT NOT NULL, "
        "created_at DOUBLE PRECISION NOT NULL)",
        "ALTER TABLE requests ADD COLUMN metadata_digest TEXT",
        "ALTER TABLE requests ADD COLUMN auto_replan TEXT",
        "ALTER TABLE nodes ADD COLUMN serve_url TEXT",
        "CREATE TABLE migrations (request_id TEXT NOT NULL REFERENCES requests(request_id) ON DELETE CASCADE, "
        "to_version INTEGER NOT NULL, from_version INTEGER NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL, "
        "schedule_json TEXT NOT NULL, summary_json TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
        "updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (request_id, to_version))",
    )),
    (4, "node latency and memory reserve", (
        "ALTER TABLE nodes ADD COLUMN latency_ms DOUBLE PRECISION",
        "ALTER TABLE nodes ADD COLUMN memory_reserve_gb DOUBLE PRECISION",
    )),
    (5, "node device, dtype and weights", (
        "ALTER TABLE nodes ADD COLUMN device TEXT",
        "ALTER TABLE nodes ADD COLUMN device_name TEXT",
        "ALTER TABLE nodes ADD COLUMN dtype TEXT",
        "ALTER TABLE nodes ADD COLUMN weights TEXT",
        "ALTER TABLE nodes ADD COLUMN device_memory_bytes BIGINT",
    )),
)

LATEST_VERSION = MIGRATIONS[-1][0]

# Held while migrating so that two workers starting at once on one PostgreSQL database do not both run DDL.
PG_MIGRATION_LOCK_KEY = 0x77696C6C6977  # "williw"

__all__ = ["LATEST_VERSION", "assignments", "MIGRATIONS", "meta", "migrations", "model_metadata", "nodes", "plans",
           "requests", "schema_version"]
