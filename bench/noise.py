"""How busy the machine was with other work while the bench ran.

The bench shares 2 cores with whatever else runs there; a figure measured while another
process took half a core is not comparable with one measured on a quiet machine. A
thread samples, once a second, the CPU time of every process outside the bench's own
tree (the coordinator, its workers and servers) and reports it per scenario as "foreign
CPU %" (100 = one core), with the load average.
"""

from __future__ import annotations

import os
import threading
import time

import psutil

INTERVAL_S = 1.0
_ADOPTED: set[int] = set()  # daemons the bench started, not its children (see adopt)


def adopt(pid: int) -> None:
    """Counts process `pid` and its descendants as the bench's own from now on: a daemon
    the bench started that is not its child (PostgreSQL's postmaster is reparented to
    init by pg_ctl), whose CPU would otherwise be counted as other processes' load."""
    _ADOPTED.add(pid)


class ForeignLoad:
    """Samples other processes' CPU use in a background thread."""

    def __init__(self) -> None:
        self._me = os.getpid()
        self._last: dict[int, float] = {}
        self._samples: list[tuple[float, float]] = []  # (time, foreign CPU % since last)
        self._stop = threading.Event()
        self._t = time.monotonic()
        self._read()
        self._thread = threading.Thread(target=self._loop, name="foreign-load", daemon=True)
        self._thread.start()

    def _ours(self) -> set[int]:
        ours = {self._me}
        for root in (self._me, *_ADOPTED):
            try:
                ours |= {root, *(c.pid for c in psutil.Process(root).children(recursive=True))}
            except psutil.Error:
                continue
        return ours

    def _read(self) -> float:
        """Seconds of CPU other processes used since the previous read."""
        ours = self._ours()
        used = 0.0
        seen: dict[int, float] = {}
        for proc in psutil.process_iter():
            if proc.pid in ours:
                continue
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total = float(t.user + t.system)
            seen[proc.pid] = total
            if proc.pid in self._last:
                used += total - self._last[proc.pid]
            elif self._last:  # born since the previous read: all of its time is new
                used += total
        self._last = seen
        return used

    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            now = time.monotonic()
            used = self._read()
            self._samples.append((now, 100.0 * used / (now - self._t)))
            self._t = now

    def window(self, start: float, end: float) -> dict[str, float]:
        """Mean and max foreign CPU % over samples taken in [start, end] (monotonic)."""
        vals = [v for t, v in self._samples if start <= t <= end]
        if not vals:
            return {"mean": 0.0, "max": 0.0}
        return {"mean": sum(vals) / len(vals), "max": max(vals)}

    def close(self) -> None:
        """Stops sampling."""
        self._stop.set()
        self._thread.join()


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]
