"""The change feed behind WatchRuns: committed run changes, fanned out to watchers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from runservice.domain.errors import WatchLaggedError
from runservice.domain.model import Run, RunChange, RunFilter, Scope, WatchUpdate

WATCH_QUEUE_LIMIT = 10_000


@dataclass(eq=False)
class _Watcher:
    scope: Scope
    run_filter: RunFilter
    queue: asyncio.Queue[WatchUpdate | None]
    lagged: bool = False
    # Runs this watcher has reported: their leaving the filter's states is reported once.
    seen: set[str] = field(default_factory=set)

    def admits(self, update: WatchUpdate) -> bool:
        """True when the watcher should receive `update` (and remembers what it sent)."""
        run = update.run
        assert run is not None
        if not self.scope.allows(run.owner):
            return False
        if self.run_filter.matches(run):
            self.seen.add(run.run_id)
            if update.change is RunChange.DELETED:
                self.seen.discard(run.run_id)
            return True
        if run.run_id in self.seen:
            self.seen.discard(run.run_id)
            return True
        return False


class ChangeFeed:
    """Delivers every committed run change to the watchers that may see it, in commit order."""

    def __init__(self, queue_limit: int = WATCH_QUEUE_LIMIT) -> None:
        self._watchers: set[_Watcher] = set()
        self._limit = queue_limit

    @property
    def watched(self) -> bool:
        """True while anyone watches (so that changes nobody reads are not even built)."""
        return bool(self._watchers)

    @property
    def watchers(self) -> int:
        """WatchRuns streams open."""
        return len(self._watchers)

    def publish(self, update: WatchUpdate) -> None:
        """Queues `update` for every watcher whose scope and filter admit the run."""
        for watcher in self._watchers:
            if not watcher.lagged and watcher.admits(update):
                self._put(watcher, update)

    def publish_deleted(self, run: Run) -> None:
        """Queues the deletion of a run another replica deleted (as its notice tells it,
        without input, result or labels) for the watchers that reported the run."""
        update = WatchUpdate(RunChange.DELETED, run)
        for watcher in self._watchers:
            if (
                not watcher.lagged
                and run.run_id in watcher.seen
                and watcher.scope.allows(run.owner)
            ):
                watcher.seen.discard(run.run_id)
                self._put(watcher, update)

    def lag_all(self) -> None:
        """Ends every watch as lagged (WATCH_LAGGED): changes were missed (another replica's
        notifications, while this one was not listening); watchers open a new watch."""
        for watcher in self._watchers:
            if not watcher.lagged:
                watcher.lagged = True
                watcher.queue.put_nowait(None)

    def close(self) -> None:
        """Ends every watch (the server is shutting down)."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(None)

    def _put(self, watcher: _Watcher, update: WatchUpdate) -> None:
        if watcher.queue.qsize() >= self._limit:
            watcher.lagged = True
            watcher.queue.put_nowait(None)
            return
        watcher.queue.put_nowait(update)

    def open(self, scope: Scope, run_filter: RunFilter) -> _Watcher:
        """Registers a watcher; changes from now on are queued for it."""
        watcher = _Watcher(scope, run_filter, asyncio.Queue())
        self._watchers.add(watcher)
        return watcher

    async def follow(self, watcher: _Watcher) -> AsyncIterator[WatchUpdate]:
        """The watcher's changes, until the feed closes; unregisters it at the end."""
        try:
            while True:
                update = await watcher.queue.get()
                if update is None:
                    if watcher.lagged:
                        raise WatchLaggedError()
                    return
                yield update
        finally:
            self._watchers.discard(watcher)

    def discard(self, watcher: _Watcher) -> None:
        """Unregisters a watcher that will not be followed."""
        self._watchers.discard(watcher)
