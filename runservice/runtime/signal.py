"""A wake-up for every task waiting at the moment it fires, and none that come later."""

from __future__ import annotations

import asyncio


class Signal:
    """Wakes the tasks waiting now. Each firing swaps in a fresh event, so a waiter that
    arrives after it waits for the next one (an `asyncio.Event` left set would wake
    everyone who comes after, and clearing it could miss a waiter not yet resumed)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        """Wakes every task waiting now."""
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self) -> None:
        """Returns at the next firing."""
        await self._event.wait()
