"""`runservice serve` on PostgreSQL: a real server process over a private PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from runservice.tokens import add_token
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.pgserver import PgServer
from tests.serverproc import (
    assert_gap_free,
    bearer,
    error_reason,
    read_log,
    running_server,
    serve_until_exit,
    wait_for,
)


def _ticker(count: int, interval: float) -> pb.StartRunRequest:
    struct = struct_pb2.Struct()
    struct.update({"count": count, "interval": interval})
    return pb.StartRunRequest(agent="ticker", input=struct)


async def test_a_server_on_postgresql_serves_survives_a_kill_and_keeps_its_data_dir(
    tmp_path: Path, postgres: PgServer
) -> None:
    """A server on PostgreSQL runs and replays a run; SIGKILLed mid-run and restarted on its
    data dir, it reconciles the run INTERRUPTED at once (its earlier life's lease ends with
    the restart) with a gap-free log; a second server on the same data dir is refused with
    one line while the first runs."""
    db = postgres.create_database()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    md = bearer(add_token(data_dir / "tokens.toml", "alice", []))
    args = ["--db", postgres.url(db)]
    try:
        async with running_server(data_dir, args=args) as server:
            async with grpc.aio.insecure_channel(server.addr) as channel:
                stub = pb_grpc.RunServiceStub(channel)
                done = (await stub.StartRun(_ticker(20, 0.0), metadata=md)).run
                events = await read_log(stub, md, done.run_id)
                assert_gap_free(events)
                assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED
                ticking = (await stub.StartRun(_ticker(100_000, 0.005), metadata=md)).run

                async def ticked() -> bool:
                    got = await stub.GetRun(pb.GetRunRequest(run_id=ticking.run_id), metadata=md)
                    return got.run.last_seq >= 10

                await wait_for(ticked, limit=10)
            refused = await serve_until_exit(data_dir, args)
            assert refused.code == 1, refused.text
            assert "uses this data dir" in refused.last
            assert "Traceback" not in refused.text
            await server.kill()
        async with (
            running_server(data_dir, args=args) as server,
            grpc.aio.insecure_channel(server.addr) as channel,
        ):
            stub = pb_grpc.RunServiceStub(channel)
            after = (await stub.GetRun(pb.GetRunRequest(run_id=ticking.run_id), metadata=md)).run
            assert after.state == run_pb2.RUN_STATE_INTERRUPTED
            events = await read_log(stub, md, ticking.run_id)
            assert_gap_free(events)
            assert events[-1].seq == after.last_seq
            replay = await read_log(stub, md, done.run_id)
            assert_gap_free(replay)
            assert replay[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    finally:
        postgres.drop_database(db)


async def test_a_server_listens_again_when_its_database_sessions_end(
    tmp_path: Path, postgres: PgServer
) -> None:
    """The database ends every session of a running server (as a restart would): the server
    LISTENs again on a new connection on its own and goes on serving; its watches, which
    may have missed other replicas' changes meanwhile, end ABORTED (WATCH_LAGGED)."""
    db = postgres.create_database()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    md = bearer(add_token(data_dir / "tokens.toml", "alice", []))
    args = ["--db", postgres.url(db)]
    try:
        async with running_server(data_dir, args=args) as server:
            listening = "listening for other replicas' notifications"
            await wait_for(lambda: listening in server.log_text(), limit=15)
            watching = grpc.aio.insecure_channel(server.addr)
            watch = pb_grpc.RunServiceStub(watching).WatchRuns(pb.WatchRunsRequest(), metadata=md)
            assert (await watch.read()).change == pb.RUN_CHANGE_SNAPSHOT_END
            postgres.psql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{db}' AND pid <> pg_backend_pid()"
            )
            await wait_for(
                lambda: server.log_text().count(listening) >= 2,
                limit=15,
                message="the server did not LISTEN again",
            )
            with pytest.raises(grpc.aio.AioRpcError) as lagged:
                await watch.read()
            assert lagged.value.code() == grpc.StatusCode.ABORTED
            assert error_reason(lagged.value) == "WATCH_LAGGED"
            await watching.close()
            async with grpc.aio.insecure_channel(server.addr) as channel:
                stub = pb_grpc.RunServiceStub(channel)
                run = (await stub.StartRun(_ticker(5, 0.0), metadata=md)).run
                events = await read_log(stub, md, run.run_id)
                assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    finally:
        postgres.drop_database(db)
