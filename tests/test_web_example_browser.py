"""The web example (examples/web) in a real browser.

Headless Chromium (Debian's package), driven by Playwright, opens the example's page; the
page starts a run through the example's backend and follows it straight from runservice
with EventSource and a read token, through a proxy that cuts connections on cue. Whether
the connection is cut mid-run, the page reloaded, or its read token expires, the page ends
showing every event of the run exactly once, in order, and the run's terminal state; its
Stop button stops the run. The page renders whatever arrives, as it arrives, so these
prove the stream itself exactly-once. The commands of docs/http.md's "Example: a web page"
run as written.

`make test-browser` runs them (it installs Playwright, the `browser` extra); elsewhere they
are skipped when Playwright or Chromium is missing. WEB_EXAMPLE_SCREENSHOT=PATH writes a
screenshot of the page after the cut to PATH (docs/images/web-example.png).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from tests.conftest import Harness, wait_for
from tests.faults import CuttingProxy
from tests.serverproc import free_port, server_env

try:
    from playwright.async_api import Browser, Page, Request, async_playwright
except ImportError:  # the `browser` extra is not installed: the tests skip (or fail, below)
    async_playwright = None

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "examples" / "web" / "backend.py"
REQUIRED = os.environ.get("WEB_EXAMPLE_BROWSER") == "required"
"""Set by `make test-browser`: a missing browser or Playwright fails instead of skipping."""
SCREENSHOT = os.environ.get("WEB_EXAMPLE_SCREENSHOT", "")
TERMINAL = frozenset(
    {
        "RUN_STATE_SUCCEEDED",
        "RUN_STATE_FAILED",
        "RUN_STATE_STOPPED",
        "RUN_STATE_INTERRUPTED",
        "RUN_STATE_TIMED_OUT",
    }
)
WAIT_MS = 30_000  # the longest any one step of a page may take

MakeServer = Callable[..., Awaitable[Harness]]


def _missing(what: str) -> NoReturn:
    if REQUIRED:
        pytest.fail(f"{what} (make test-browser needs it)")
    pytest.skip(what)


def _offset(seq: int) -> str:
    return f"{0:016d}_{seq:016d}"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright (whose own browsers are never
    downloaded)."""
    if async_playwright is None:
        _missing("Playwright is not installed: pip install -e '.[browser]'")
    chromium = shutil.which("chromium")
    if chromium is None:
        _missing("Chromium is not installed: apt-get install chromium")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            await launched.close()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


@contextlib.asynccontextmanager
async def process(command: list[str], log: Path, env: dict[str, str]) -> AsyncIterator[Any]:
    """A subprocess writing to `log`; SIGTERM, then SIGKILL if it lingers, on the way out."""
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=ROOT
        )
    try:
        yield proc
    except BaseException:
        print(f"--- {log.name} ---\n{_tail(log)}")
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def answers(url: str, *statuses: int) -> bool:
    """Whether GET `url` answers one of `statuses` (False while nothing listens)."""
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status in statuses
    except aiohttp.ClientError:
        return False


async def serving(proc: Any, url: str, *statuses: int) -> None:
    """Waits until GET `url` answers one of `statuses`; fails at once if `proc` exits."""

    async def up() -> bool:
        assert proc.returncode is None, f"exited with {proc.returncode} before serving {url}"
        return await answers(url, *statuses)

    await wait_for(up, limit=30, interval=0.05, message=f"nothing answered {url}")


async def catch_up(base: str, run_id: str, token: str) -> list[dict[str, Any]]:
    """The run's whole log, read over HTTP with the user's token."""
    events: list[dict[str, Any]] = []
    at = "-1"
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        while True:
            url = f"{base}/v1/runs/{run_id}/events"
            async with session.get(url, params={"offset": at}, headers=headers) as response:
                assert response.status == 200, await response.text()
                events += await response.json()
                at = response.headers["Stream-Next-Offset"]
                if "Stream-Up-To-Date" in response.headers:
                    return events


@dataclass
class PageUnderTest:
    """The example's page in a browser tab, and every request it made."""

    page: Page
    user_token: str
    requests: list[Request] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @classmethod
    async def open(cls, browser: Browser, url: str, user_token: str) -> PageUnderTest:
        """Opens `url` in a new tab (a context of its own: its own sessionStorage)."""
        context = await browser.new_context(viewport={"width": 820, "height": 900})
        tab = cls(await context.new_page(), user_token)
        # A lambda: Playwright marks each handler with an attribute, which a builtin refuses.
        tab.page.on("request", lambda request: tab.requests.append(request))  # noqa: PLW0108
        tab.page.on("pageerror", lambda error: tab.errors.append(str(error)))
        tab.page.on("console", lambda message: print(f"console.{message.type}: {message.text}"))
        await tab.page.goto(url)
        return tab

    async def start(self, count: int, interval: float) -> str:
        """Starts a run of `count` ticks from the page; its id."""
        await self.page.fill("#count", str(count))
        await self.page.fill("#interval", str(interval))
        await self.page.click("#start")
        await self.page.wait_for_function(
            "() => document.querySelector('#run-id').textContent !== 'none'", timeout=WAIT_MS
        )
        return str(await self.page.text_content("#run-id"))

    async def shown(self, at_least: int) -> None:
        """Waits until the page shows `at_least` events."""
        await self.page.wait_for_function(
            "n => document.querySelectorAll('#events li').length >= n",
            arg=at_least,
            timeout=WAIT_MS,
        )

    async def finished(self) -> str:
        """Waits until the page shows a terminal state and has closed its stream; the state."""
        await self.page.wait_for_function(
            "() => document.querySelector('#state').dataset.terminal === 'true'"
            " && document.querySelector('#stream').textContent.startsWith('closed')",
            timeout=WAIT_MS,
        )
        return str(await self.page.text_content("#state"))

    async def text(self, selector: str) -> str:
        """The text of an element."""
        return str(await self.page.text_content(selector))

    def event_streams(self) -> list[Request]:
        """The requests of the run's event stream, reconnects included, in order."""
        return [r for r in self.requests if urlsplit(r.url).path.endswith("/events")]

    def minted(self) -> int:
        """How many read tokens the page asked its backend for."""
        return sum(1 for r in self.requests if urlsplit(r.url).path.endswith("/token"))

    async def check_shows_the_log(self, log: list[dict[str, Any]], state: str) -> None:
        """The page shows the run's whole log, each event once and in order, ending in
        `state`; what it saved is the same; no user credential went into a URL."""
        shown = await self.page.eval_on_selector_all(
            "#events li", "items => items.map(li => [li.dataset.seq, li.dataset.type])"
        )
        assert shown == [[e["seq"], e["type"]] for e in log]
        assert [int(seq) for seq, _ in shown] == list(range(1, len(log) + 1))
        saved = await self.page.evaluate(
            "() => JSON.parse(sessionStorage.getItem('runservice-web-example'))"
        )
        assert saved["events"] == log
        assert saved["offset"] == _offset(len(log))
        assert log[-1]["type"] == "run.state" and log[-1]["state"] == state
        assert await self.text("#state") == state
        assert await self.text("#count-shown") == str(len(log))
        self.check_urls()
        assert not self.errors

    def check_urls(self) -> None:
        """No URL the page asked for holds the user's token; the event streams carry a
        read token as access_token."""
        assert self.requests
        for request in self.requests:
            assert self.user_token not in request.url
        for request in self.event_streams():
            (token,) = parse_qs(urlsplit(request.url).query)["access_token"]
            assert token.startswith("rsr_")


@dataclass
class Example:
    """runservice (in-process), a cutting proxy in front of its HTTP edge, and the
    example's backend (a process) serving the page."""

    server: Harness
    proxy: CuttingProxy
    url: str

    @property
    def runservice(self) -> str:
        """runservice's HTTP edge, straight."""
        return f"http://127.0.0.1:{self.server.app.http_port}"

    async def log(self, run_id: str) -> list[dict[str, Any]]:
        """The run's whole log."""
        return await catch_up(self.runservice, run_id, self.server.tokens["alice"])


@pytest.fixture
async def example(
    make_server: MakeServer, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Example]:
    """The example, its backend holding alice's token; the browser reaches runservice
    through the proxy only. Parametrized indirectly, the backend's read tokens live that
    many seconds (300 otherwise)."""
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    server = await make_server(http_listen="127.0.0.1:0", http_cors_origins=(origin,))
    proxy = await CuttingProxy("127.0.0.1", server.app.http_port).start()
    token_file = tmp_path / "alice.token"
    token_file.write_text(server.tokens["alice"] + "\n")
    command = [
        sys.executable,
        str(BACKEND),
        *("--listen", f"127.0.0.1:{port}"),
        *("--runservice", f"http://127.0.0.1:{server.app.http_port}"),
        *("--public-runservice", f"http://{proxy.address}"),
        *("--token-file", str(token_file)),
        *("--read-token-ttl", str(getattr(request, "param", 300))),
    ]
    try:
        async with process(command, tmp_path / "backend.log", server_env()) as backend:
            await serving(backend, origin + "/", 200)
            yield Example(server, proxy, origin + "/")
    finally:
        await proxy.close()


async def test_a_cut_connection_resumes_by_the_browser_s_own_reconnect(
    browser: Browser, example: Example
) -> None:
    """Cut mid-run, the stream is reconnected by the browser itself (the same URL, with
    Last-Event-ID): the page ends showing every event once and RUN_STATE_SUCCEEDED."""
    tab = await PageUnderTest.open(browser, example.url, example.server.tokens["alice"])
    run_id = await tab.start(count=16, interval=0.4)
    await tab.shown(4)
    assert example.proxy.cut() > 0
    assert await tab.finished() == "RUN_STATE_SUCCEEDED"
    log = await example.log(run_id)
    await tab.check_shows_the_log(log, "RUN_STATE_SUCCEEDED")

    first, again = tab.event_streams()
    assert again.url == first.url and parse_qs(urlsplit(first.url).query)["offset"] == ["-1"]
    assert "last-event-id" not in await first.all_headers()
    resumed = (await again.all_headers())["last-event-id"]
    assert _offset(4) <= resumed < _offset(len(log)), "cut after the 4th event, before the end"
    assert await tab.text("#connections") == "2" and tab.minted() == 1
    if SCREENSHOT:
        await tab.page.screenshot(path=ROOT / SCREENSHOT, full_page=True)


async def test_a_reloaded_page_resumes_from_the_offset_it_kept(
    browser: Browser, example: Example
) -> None:
    """Reloaded mid-run, the page shows what it kept and opens a new stream from the
    offset it kept, with the read token it kept: it ends showing every event once."""
    tab = await PageUnderTest.open(browser, example.url, example.server.tokens["alice"])
    run_id = await tab.start(count=16, interval=0.4)
    await tab.shown(4)
    await tab.page.reload()
    assert await tab.finished() == "RUN_STATE_SUCCEEDED"
    await tab.check_shows_the_log(await example.log(run_id), "RUN_STATE_SUCCEEDED")

    before, after = tab.event_streams()
    kept = parse_qs(urlsplit(after.url).query)
    assert kept["offset"][0] >= _offset(4) and "last-event-id" not in await after.all_headers()
    assert kept["access_token"] == parse_qs(urlsplit(before.url).query)["access_token"]
    assert tab.minted() == 1 and await tab.text("#connections") == "1"


@pytest.mark.parametrize("example", [2], indirect=True, ids=["read-token-ttl-2s"])
async def test_an_expired_read_token_is_renewed_and_the_stream_resumes(
    browser: Browser, example: Example
) -> None:
    """With read tokens of 2 seconds, runservice ends the stream when each expires; the
    page gets a new one from its backend and resumes: every event once, and a reload
    after the token expired resumes with a fresh one too."""
    tab = await PageUnderTest.open(browser, example.url, example.server.tokens["alice"])
    run_id = await tab.start(count=20, interval=0.4)
    await wait_for(lambda: tab.minted() >= 2, limit=20, message="no token was renewed")
    await tab.page.reload()
    assert await tab.finished() == "RUN_STATE_SUCCEEDED"
    await tab.check_shows_the_log(await example.log(run_id), "RUN_STATE_SUCCEEDED")
    streams = tab.event_streams()
    tokens = {parse_qs(urlsplit(r.url).query)["access_token"][0] for r in streams}
    assert len(tokens) >= 3  # the first, and at least two renewed, over some 8 seconds


async def test_stop_ends_the_run_and_the_page_shows_it_stopped(
    browser: Browser, example: Example
) -> None:
    """Stop, pressed mid-run, stops the run: the stream brings its terminal event, and the
    page ends showing every event once and RUN_STATE_STOPPED."""
    tab = await PageUnderTest.open(browser, example.url, example.server.tokens["alice"])
    run_id = await tab.start(count=1000, interval=0.2)
    await tab.shown(3)
    await tab.page.click("#stop")
    assert await tab.finished() == "RUN_STATE_STOPPED"
    log = await example.log(run_id)
    assert log[-1]["seq"] != "1002"  # stopped before its end
    await tab.check_shows_the_log(log, "RUN_STATE_STOPPED")


# -- docs/http.md, "Example: a web page" ------------------------------------------------

DOC_PORTS = ("8080", "8000")
"""The ports the section names (runservice's HTTP edge, the backend), each moved to a free
one here."""


def doc_commands() -> list[str]:
    """The commands of the section's ```bash blocks (its ```sh blocks, if any, are left
    to test_web_api's run of the whole page), continuation lines joined."""
    text = (ROOT / "docs" / "http.md").read_text()
    section = text.split("\n## Example: a web page\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    joined = re.sub(r"\\\n\s*", " ", "\n".join(blocks))
    lines = (line.strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


async def test_the_commands_of_the_http_docs_example_run(browser: Browser, tmp_path: Path) -> None:
    """The section's two commands, as written (in a HOME of the test's own, on free
    ports), serve the page; a run started there shows every event once."""
    ports = {name: str(free_port()) for name in DOC_PORTS}
    moved = re.compile(r"\b({})\b".format("|".join(DOC_PORTS)))
    server_command, backend_command = (
        moved.sub(lambda port: ports[port.group(1)], command) for command in doc_commands()
    )
    home = tmp_path / "home"
    home.mkdir()
    env = server_env({"HOME": str(home), "RUNSERVICE_LISTEN": f"127.0.0.1:{free_port()}"})
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the venv, as if activated
    runservice = f"http://127.0.0.1:{ports['8080']}"
    page = f"http://127.0.0.1:{ports['8000']}/"
    token_file = home / ".local" / "share" / "runservice" / "dev-token"
    server = ["bash", "-c", f"exec {server_command}"]
    backend = ["bash", "-c", f"exec {backend_command}"]
    async with process(server, tmp_path / "server.log", env) as serve:
        await serving(serve, f"{runservice}/v1/agents", 401)
        async with process(backend, tmp_path / "backend.log", env) as example:
            await serving(example, page, 200)
            token = token_file.read_text().strip()
            tab = await PageUnderTest.open(browser, page, token)
            run_id = await tab.start(count=5, interval=0.1)
            assert await tab.finished() == "RUN_STATE_SUCCEEDED"
            log = await catch_up(runservice, run_id, token)
            await tab.check_shows_the_log(log, "RUN_STATE_SUCCEEDED")
