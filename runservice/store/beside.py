"""What is stored beside a run's log: SendInput's inputs, snapshots and checkpoints.

Receipts, snapshots and checkpoints are written by the writer's commits, in the
transaction of the events they follow (see Writer.put_beside); inputs are offered by
SendInput in a transaction of their own, before the run's executor appends them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runservice.domain.model import (
    Beside,
    Checkpoint,
    InputReceipt,
    PendingInput,
    Snapshot,
)
from runservice.store.driver import Sql

_Statements = list[tuple[str, Any]]

_ACTIVE = "('PENDING', 'RUNNING')"


class BesideRows:
    """The statements of beside records, and the queries that read them back."""

    def __init__(self, engine: AsyncEngine) -> None:
        pg = engine.dialect.name == "postgresql"
        self._pg = pg

        def p(i: int) -> str:
            return f"${i}" if pg else f"?{i}"

        self._receipt = (
            f"UPDATE run_inputs SET seq = {p(1)} WHERE run_id = {p(2)} AND request_id = {p(3)}"
        )
        self._snapshot = (
            f"INSERT INTO run_snapshots (run_id, seq, data) VALUES ({p(1)}, {p(2)}, {p(3)})"
            " ON CONFLICT (run_id) DO UPDATE SET seq = excluded.seq, data = excluded.data"
        )
        self._no_snapshot = f"DELETE FROM run_snapshots WHERE run_id = {p(1)}"
        self._checkpoint = (
            "INSERT INTO run_checkpoints (run_id, seq, state, inputs_used, snapshot)"
            f" VALUES ({p(1)}, {p(2)}, {p(3)}, {p(4)}, {p(5)}) ON CONFLICT (run_id) DO UPDATE"
            " SET seq = excluded.seq, state = excluded.state,"
            " inputs_used = excluded.inputs_used, snapshot = excluded.snapshot"
        )
        self._offer = (
            "INSERT INTO run_inputs (run_id, request_id, digest, body, at_us)"
            f" SELECT run_id, {p(2)}, {p(3)}, {p(4)}, {p(5)} FROM runs"
            f" WHERE run_id = {p(1)} AND state IN {_ACTIVE} ON CONFLICT DO NOTHING"
        )
        self._receipt_of = (
            f"SELECT digest, seq FROM run_inputs WHERE run_id = {p(1)} AND request_id = {p(2)}"
        )
        self._pending = (
            "SELECT run_id, request_id, body FROM run_inputs"
            f" WHERE run_id = {p(1)} AND seq IS NULL ORDER BY at_us, request_id"
        )

    def statements(self, records: Sequence[Beside]) -> _Statements:
        """The writes of `records`, in order (the latest snapshot or checkpoint wins)."""
        out: _Statements = []
        for record in records:
            if isinstance(record, InputReceipt):
                out.append((self._receipt, (record.seq, record.run_id, record.request_id)))
            elif isinstance(record, Snapshot) and not record.data:  # none (a resume's)
                out.append((self._no_snapshot, (record.run_id,)))
            elif isinstance(record, Snapshot):
                out.append((self._snapshot, (record.run_id, record.seq, record.data)))
            elif isinstance(record, Checkpoint):
                values = (record.run_id, record.seq, record.state, record.inputs_used)
                out.append((self._checkpoint, (*values, record.snapshot)))
        return out

    async def offer(
        self, sql: Sql, run_id: str, request_id: str, *, digest: str, body: str, at_us: int
    ) -> tuple[str, int | None] | None:
        """Records an input for an active run unless its request_id is there; returns the
        request's (digest, seq or None while not appended), or None when the run is not
        active and never took that request_id."""
        await sql.execute(self._offer, (run_id, request_id, digest, body, at_us))
        try:
            return await self.receipt(sql, run_id, request_id)
        except KeyError:
            return None

    async def receipt(self, sql: Sql, run_id: str, request_id: str) -> tuple[str, int | None]:
        """(digest, seq or None) of an offered input; KeyError if there is none."""
        rows = await sql.fetch(self._receipt_of, (run_id, request_id))
        if not rows:
            raise KeyError(request_id)
        return str(rows[0][0]), None if rows[0][1] is None else int(rows[0][1])

    async def pending(self, sql: Sql, run_id: str) -> list[PendingInput]:
        """The run's inputs not yet appended, in the order they were offered."""
        rows = await sql.fetch(self._pending, (run_id,))
        return [PendingInput(row[0], row[1], json.loads(row[2])) for row in rows]

    async def snapshot(self, conn: AsyncConnection, run_id: str) -> Snapshot | None:
        """The run's latest snapshot, if any."""
        row = (
            await conn.execute(
                text("SELECT seq, data FROM run_snapshots WHERE run_id = :run_id"),
                {"run_id": run_id},
            )
        ).first()
        return None if row is None else Snapshot(run_id, int(row[0]), str(row[1]))

    async def checkpoint(self, conn: AsyncConnection, run_id: str) -> Checkpoint | None:
        """The run's latest checkpoint, if any."""
        row = (
            await conn.execute(
                text(
                    "SELECT seq, state, inputs_used, snapshot FROM run_checkpoints"
                    " WHERE run_id = :run_id"
                ),
                {"run_id": run_id},
            )
        ).first()
        if row is None:
            return None
        return Checkpoint(run_id, int(row[0]), str(row[1]), int(row[2]), str(row[3]))
