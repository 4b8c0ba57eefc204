"""Table definitions. Times are integer microseconds since the epoch (UTC), portable and cheap."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)

metadata = MetaData()

schema_version = Table(
    "runservice_schema",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text, nullable=False),
    Column("applied_us", BigInteger, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("owner", String(255), nullable=False),
    Column("agent", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("input", Text, nullable=False),
    Column("result", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("thread_id", String(255), nullable=False, default=""),
    Column("labels", Text, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("started_us", BigInteger, nullable=True),
    Column("ended_us", BigInteger, nullable=True),
    Column("last_seq", BigInteger, nullable=False, default=0),
    Column("stop_reason", Text, nullable=False, default=""),
    Column("request_id", String(255), nullable=False, default=""),
    Column("multitask_strategy", String(16), nullable=False),
    Column("timeout_s", Float, nullable=True),
    # Added by migration 2: a digest of the StartRun request, to tell a retry from a reuse.
    Column("request_hash", String(64), nullable=False, default="", server_default=""),
    # Added by migration 5: the lease (runservice_leases.holder) the run executes under.
    Column("executor", String(64), nullable=False, default="", server_default=""),
    Index("ix_runs_owner_run_id", "owner", "run_id"),
    Index("ix_runs_owner_thread", "owner", "thread_id"),
    Index("ix_runs_state", "state"),
)

run_labels = Table(
    "run_labels",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("value", Text, nullable=False),
    Index("ix_run_labels_key_value", "key", "value"),
)

events = Table(
    "run_events",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at_us", BigInteger, nullable=False),
    Column("type", String(255), nullable=False),
    # 0: no payload, 1: JSON object (data), 2: UTF-8 text, 3: binary.
    Column("payload_kind", SmallInteger, nullable=False),
    Column("payload", LargeBinary, nullable=True),
    Column("state", String(16), nullable=True),
    Column("error", Text, nullable=True),
    # Added by migration 3: the encoded RunEvent, served as is on replay.
    Column("wire", LargeBinary, nullable=True),
)

# Added by migration 4: keys every server of the database shares (the page-token key).
secrets = Table(
    "runservice_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

# Added by migration 5: each replica's lease on the runs it executes (PostgreSQL replicas).
leases = Table(
    "runservice_leases",
    metadata,
    Column("holder", String(64), primary_key=True),  # one per process life
    Column("replica", String(64), nullable=False),  # one per data dir, across restarts
    Column("expires_us", BigInteger, nullable=False),  # by the database's clock
    Index("ix_leases_replica", "replica"),
)

# Added by migration 5: appends that do not come from a run's own agent (a stop today),
# durable until the replica executing the run takes them.
run_requests = Table(
    "run_requests",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("body", Text, nullable=False),
    Column("at_us", BigInteger, nullable=False),
)
