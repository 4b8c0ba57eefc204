"""Page tokens are signed with a key the database holds: valid on every server of it."""

from __future__ import annotations

from pathlib import Path

from runservice.store.engine import sqlite_url
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import start_harness
from tests.fakes import FakeClock
from tests.helpers import read_all, start


async def test_a_page_token_from_one_server_is_valid_on_another_of_the_same_database(
    tmp_path: Path,
) -> None:
    """A ListRuns page token issued by one server is accepted by a second server with its
    own data directory on the same database (the signing key lives in the database)."""
    clock = FakeClock()
    first = await start_harness(tmp_path / "a", clock)
    alice = first.caller("alice")
    made = [await start(alice, "echo", text=f"run {i}") for i in range(3)]
    for run in made:
        await read_all(alice, run.run_id)
    page = await alice.ListRuns(pb.ListRunsRequest(page_size=1))
    assert page.next_page_token
    await first.channel.close()
    await first.app.stop()

    db = sqlite_url(str(tmp_path / "a" / "runservice.db"))
    second = await start_harness(tmp_path / "b", clock, db=db)
    try:
        caller = second.caller("alice")  # the same user, with a token of the second server
        rest = await caller.ListRuns(
            pb.ListRunsRequest(page_size=5, page_token=page.next_page_token)
        )
        assert [r.run_id for r in rest.runs] == [r.run_id for r in reversed(made[:2])]
    finally:
        await second.channel.close()
        await second.app.stop()


async def test_a_secret_key_left_by_an_earlier_release_keeps_its_page_tokens(
    tmp_path: Path,
) -> None:
    """A data directory's secret.key from before the key moved to the database becomes the
    database's key, so page tokens issued before an upgrade stay valid."""
    data = tmp_path / "a"
    data.mkdir()
    (data / "secret.key").write_bytes(b"k" * 32)
    harness = await start_harness(data, FakeClock())
    try:
        key = await harness.app.store.shared_secret("page-tokens", b"other" * 8)
        assert key == b"k" * 32
    finally:
        await harness.channel.close()
        await harness.app.stop()
