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
    # Added by migration 6, with indexes on (expire_us) and (retention_s, ended_us) that the
    # purge reads: the run's own retention (NULL: the server's --retention) and, for a run
    # that ended with one, when it expires (ended_us + retention_s).
    Column("retention_s", Float, nullable=True),
    Column("expire_us", BigInteger, nullable=True),
    # Added by migration 7: the run's own webhook (StartRunRequest.webhook_url), "" for none.
    Column("webhook_url", Text, nullable=False, default="", server_default=""),
    # Added by migration 9: the live fields an agent moves, and its resumes.
    Column("waiting_for_input", SmallInteger, nullable=False, default=0, server_default="0"),
    Column("progress", Text, nullable=True),  # JSON {"done", "total", "message"}
    Column("usage", Text, nullable=True),  # JSON {name: number}
    Column("resume_count", Integer, nullable=False, default=0, server_default="0"),
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
    # 0: no payload, 1: JSON object (data), 2: UTF-8 text, 3: binary, 4: JSON value text.
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

# Added by migration 8: external runs (agent `external`): each one's stream record, its
# idempotent producers, and its append units of more than one event.
streams = Table(
    "streams",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("owner", String(255), nullable=False),
    Column("path", Text, nullable=False),  # "" for runs started with StartRun
    Column("content_type", String(255), nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("access_us", BigInteger, nullable=False),
    Column("ttl_s", BigInteger, nullable=True),
    Column("expires_us", BigInteger, nullable=True),
    Column("deadline_us", BigInteger, nullable=True),  # when it expires as of access_us
    Column("stream_seq", Text, nullable=False),
    Column("fork_of", String(64), nullable=False),
    Column("fork_seq", BigInteger, nullable=False),
    Column("fork_sub", BigInteger, nullable=False),
    Column("deleted", SmallInteger, nullable=False),
    Column("closed_by", Text, nullable=False),
    Index("ix_streams_deadline", "deadline_us"),
    Index("ix_streams_fork_of", "fork_of"),
)

stream_producers = Table(
    "stream_producers",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("producer_id", Text, primary_key=True),
    Column("epoch", BigInteger, nullable=False),
    Column("seq", BigInteger, nullable=False),
)

stream_units = Table(
    "stream_units",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("first_seq", BigInteger, primary_key=True, autoincrement=False),
    Column("last_seq", BigInteger, nullable=False),
)

# Added by migration 7: completion webhooks. A delivery is written in the transaction that
# commits its run's end; `next_us` is when it is due (while `claimed`, when the claim of
# the server attempting it lapses); `attempts` counts the claims, each one attempt.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("delivery_id", String(64), primary_key=True),  # the webhook-id header
    Column("run_id", String(64), nullable=False),
    Column("target", String(16), nullable=False),  # DEPLOYMENT or RUN
    Column("url", Text, nullable=False),
    Column("body", LargeBinary, nullable=False),  # the JSON POSTed, the same every attempt
    Column("state", String(16), nullable=False),  # PENDING, DELIVERED or FAILED
    Column("created_us", BigInteger, nullable=False),
    Column("next_us", BigInteger, nullable=False),
    Column("claimed", SmallInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("ended_us", BigInteger, nullable=True),
    Index("ix_webhook_deliveries_due", "state", "next_us"),
    Index("ix_webhook_deliveries_run_id", "run_id"),
)

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("delivery_id", String(64), primary_key=True),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("at_us", BigInteger, nullable=False),
    Column("duration_us", BigInteger, nullable=False),
    Column("status", Integer, nullable=True),  # the HTTP status; NULL: no answer
    Column("error", Text, nullable=False),  # why it failed, safe to show; "" on success
)

# Added by migration 9: SendInput's inputs. A row is written when the input is accepted
# (seq NULL) and given the seq of its `input` event in the transaction that appends it.
run_inputs = Table(
    "run_inputs",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("request_id", String(255), primary_key=True),
    Column("digest", String(64), nullable=False),
    Column("body", Text, nullable=False),
    Column("at_us", BigInteger, nullable=False),
    Column("seq", BigInteger, nullable=True),
)

# Added by migration 9: each run's latest snapshot (the state of its output as of seq).
run_snapshots = Table(
    "run_snapshots",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("data", Text, nullable=False),
)

# Added by migration 9: each resumable run's latest checkpoint.
run_checkpoints = Table(
    "run_checkpoints",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("state", Text, nullable=False),
    Column("inputs_used", Integer, nullable=False),
    Column("snapshot", Text, nullable=False),
)

RUN_SIDE_TABLES = (run_inputs, run_snapshots, run_checkpoints)
"""Tables of rows beside a run's log, deleted with the run."""
