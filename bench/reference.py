"""The Durable Streams Node reference server (`@durable-streams/server`, pinned in
conformance/package.json), started by conformance/reference-server.mjs: the HTTP edge
scenario's baseline (bench/http_edge.py).

`unavailable()` says why it cannot run here (no node, or its package cannot be
installed); `start()` runs it on a free loopback port as a `bench.servers.Server`, so
that its CPU and RSS are read like any server under test.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from bench.servers import REPO, STARTUP_S, Server

CONFORMANCE = REPO / "conformance"
PACKAGE = CONFORMANCE / "node_modules" / "@durable-streams" / "server"
NPM_CI_S = 600.0
STORES = ("memory", "file")  # the reference server's stores: in memory (its default), LMDB


def unavailable() -> str:
    """Why the reference server cannot run here, or "" when it can. Installs its
    package first (`npm ci` in conformance/, as conformance/run-reference.sh does)
    when node and npm are there and the package is not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        return "node is not on PATH (the reference server needs Node 20 or later)"
    if PACKAGE.exists():
        return ""
    if npm is None:
        return f"{PACKAGE.relative_to(REPO)} is missing and npm is not on PATH to install it"
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=CONFORMANCE,
        capture_output=True,
        text=True,
        timeout=NPM_CI_S,
        check=False,
    )
    if done.returncode != 0 or not PACKAGE.exists():
        return f"`npm ci` in conformance/ failed: {done.stderr.strip()[-500:]}"
    return ""


def start(log_path: Path, store: str = "memory") -> Server:
    """The reference server on a free loopback port, its store in memory or (`file`)
    in LMDB and segment files under a fresh directory beside `log_path`. Its `addr`
    is its base URL."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError(unavailable())
    cmd = [node, "reference-server.mjs", "--port", "0"]
    if store == "file":
        data = log_path.with_suffix(".data")
        data.mkdir(parents=True, exist_ok=True)
        cmd += ["--data-dir", str(data)]
    log = log_path.open("wb")  # fresh: the LISTENING line read back is this start's
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=CONFORMANCE)
    server = Server("reference", proc, "", "", log_path, log)
    server.addr = _listening(server)
    return server


def _listening(server: Server) -> str:
    """The URL the server prints (`LISTENING <url> ...`) once it serves."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        for line in server.log_tail().splitlines():
            if line.startswith("LISTENING "):
                return line.split()[1].rstrip("/")
        if server.proc.poll() is not None:
            raise RuntimeError(f"reference server exited:\n{server.log_tail()}")
        time.sleep(0.05)
    server.stop(1)
    raise TimeoutError(f"reference server not listening within {STARTUP_S:g}s")
