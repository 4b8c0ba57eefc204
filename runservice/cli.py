"""The `runservice` command: the server, token management, and client commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

import runservice
from runservice import config
from runservice.jsonmap import whole_numbers

DEFAULT_ADDR = "127.0.0.1:50051"
# A client command says it is still connecting after CONNECT_NOTICE_S, and gives up on a
# server it never reached after CONNECT_LIMIT_S (once connected, streams resume for longer).
CONNECT_NOTICE_S = 1.0
CONNECT_LIMIT_S = 4.0
FINGERPRINT_MIN = 4  # hex digits `tokens revoke --fingerprint` needs, so a typo matches nothing

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class UsageError(Exception):
    """The command line is refused before or instead of a call (exit status 2)."""


class CommandError(Exception):
    """A command failed on this machine (exit status 1); `code` is a gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Parser(argparse.ArgumentParser):
    """Raises UsageError instead of printing the usage and exiting, so that `main` reports
    every usage error in one line (or one JSON object with --json)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `runservice` console script.

    Exit status: 0 done, 1 the command failed (the server refused it or was not reached,
    a followed run did not succeed), 2 usage error, 130 interrupted. With --json, errors
    are one JSON object on stderr: {"code", "reason", "message"}.
    """
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except UsageError as exc:
        _print_error("INVALID_ARGUMENT", "", str(exc), as_json, show_code=False)
        return 2
    except CommandError as exc:
        _print_error(exc.code, "", exc.message, as_json, show_code=False)
        return 1
    except KeyboardInterrupt:
        return 130


def _print_error(code: str, reason: str, message: str, as_json: bool, show_code: bool) -> None:
    """One line on stderr: `error: [CODE: ]message`, or {"code", "reason", "message"}."""
    if as_json:
        line = json.dumps({"code": code, "reason": reason, "message": message})
        print(line, file=sys.stderr, flush=True)
    else:
        prefix = f"{code}: " if show_code else ""
        err.print(f"[red]error:[/] {prefix}{escape(message)}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="runservice",
        description="Run long jobs on the server and follow their event logs from anywhere.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {runservice.version()}")
    sub = parser.add_subparsers(metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server")
    config.add_serve_arguments(serve)
    serve.set_defaults(handler=_serve)

    _add_tokens_command(sub)
    _add_config_command(sub)

    def client_command(
        name: str, help: str, run: Callable[..., Coroutine[Any, Any, int]]
    ) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help)
        cmd.add_argument(
            "--addr",
            default=None,
            help=f"server address (env RUNSERVICE_ADDR; default {DEFAULT_ADDR})",
        )
        cmd.add_argument(
            "--token",
            default=None,
            help="bearer token (else env RUNSERVICE_TOKEN; else, for a loopback address, "
            "the development token in RUNSERVICE_HOME)",
        )
        cmd.add_argument("--json", action="store_true", help="print JSON, errors too (on stderr)")
        cmd.set_defaults(handler=lambda args: _client(args, run))
        return cmd

    start = client_command("start", "start a run", _start)
    start.add_argument("agent", help="the agent to run (see `runservice agents`)")
    start.add_argument("--input", default="{}", help="the input, a JSON object")
    start.add_argument("--thread", default="", help="thread id")
    start.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="a label; repeatable"
    )
    start.add_argument(
        "--timeout", type=config.parse_duration, default=None, help="time limit, e.g. 10m"
    )
    start.add_argument(
        "--retention",
        type=config.parse_duration,
        default=None,
        metavar="DURATION",
        help="how long the run and its log are kept after it ends, e.g. 30d (default: the "
        "server's --retention)",
    )
    start.add_argument(
        "--strategy",
        choices=("reject", "interrupt", "enqueue"),
        default="reject",
        help="what to do when the thread has an active run (default reject)",
    )
    start.add_argument("--request-id", default="", help="idempotency key: a retry returns the run")
    start.add_argument(
        "--follow", "-f", action="store_true", help="then print its events until it ends"
    )

    get = client_command("get", "show a run", _get)
    get.add_argument("run_id")

    ls = client_command("ls", "list runs, newest first", _ls)
    ls.add_argument(
        "--state", action="append", default=[], help="only runs in this state; repeatable"
    )
    ls.add_argument("--agent", default="", help="only runs of this agent")
    ls.add_argument("--thread", default="", help="only runs of this thread")
    ls.add_argument(
        "--limit",
        type=int,
        default=50,
        help="at most this many runs (default 50; with --watch, rows of the table)",
    )
    ls.add_argument("--all-users", action="store_true", help="every user's runs (admin)")
    ls.add_argument(
        "--watch",
        "-w",
        action="store_true",
        help="a live table fed by WatchRuns: runs appear, progress and finish as they do; "
        "Ctrl-C quits. Piped: one line per change; with --json, one JSON object per change",
    )

    stop = client_command("stop", "stop a run", _stop)
    stop.add_argument("run_id")
    stop.add_argument("--reason", default="", help="why; recorded on the run")

    send = client_command("send", "send input to a running run (its agent receives it)", _send)
    send.add_argument("run_id")
    send.add_argument(
        "--input", required=True, help="the input, a JSON object, e.g. '{\"approve\": true}'"
    )
    send.add_argument(
        "--request-id", default="", help="idempotency key: a retry delivers the input once"
    )

    rm = client_command("rm", "delete a finished run and its log", _rm)
    rm.add_argument("run_id")

    tail = client_command("tail", "print a run's events, then follow it until it ends", _tail)
    tail.add_argument("run_id")
    tail.add_argument(
        "--from-seq", type=_seq, default=1, help="first seq to print, 0 or more (default 1)"
    )

    client_command("agents", "list the agents the server runs", _agents)

    top = client_command(
        "top",
        "a live screen of the server process's load and its active runs (admin)",
        _top,
    )
    top.add_argument(
        "--interval",
        type=_interval,
        default=1.0,
        help="time between samples, e.g. 500ms or 2s (default 1s); rates are over it",
    )
    top.add_argument(
        "--once",
        action="store_true",
        help="measure for one interval, print that sample and exit (--json implies it)",
    )
    top.set_defaults(endless=True)
    return parser


def _add_tokens_command(sub: Any) -> None:
    """`runservice tokens add|list|revoke`: edit the tokens file the server rereads."""
    tokens = sub.add_parser("tokens", help="manage the tokens file")
    tokens_sub = tokens.add_subparsers(metavar="ACTION")
    add = tokens_sub.add_parser("add", help="add a token; prints it as the last line")
    add.add_argument("--file", type=Path, required=True, help="the tokens file (TOML)")
    add.add_argument("--user", required=True, help="the user the token authenticates")
    add.add_argument("--role", action="append", default=[], help="a role, e.g. admin; repeatable")
    add.add_argument("--json", action="store_true", help="print JSON (it holds the token)")
    add.set_defaults(handler=_tokens_add)
    listing = tokens_sub.add_parser(
        "list", help="show each token's user, roles and fingerprint (never the token)"
    )
    listing.add_argument("--file", type=Path, required=True, help="the tokens file (TOML)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_tokens_list)
    revoke = tokens_sub.add_parser(
        "revoke", help="remove a user's tokens, or one token by fingerprint"
    )
    revoke.add_argument("--file", type=Path, required=True, help="the tokens file (TOML)")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--user", help="remove every token of this user")
    which.add_argument(
        "--fingerprint", type=_fingerprint, help="remove the token whose fingerprint starts so"
    )
    revoke.add_argument("--json", action="store_true", help="print JSON")
    revoke.set_defaults(handler=_tokens_revoke)


def _add_config_command(sub: Any) -> None:
    """`runservice config check FILE`: the server's configuration file, checked offline."""
    cfg = sub.add_parser("config", help="check a server configuration file (serve --config)")
    cfg_sub = cfg.add_subparsers(metavar="ACTION")
    check = cfg_sub.add_parser(
        "check",
        help="report every problem of FILE, one line each (exit 1), else print `FILE: ok`",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="the configuration file (TOML)")
    check.add_argument(
        "--json",
        action="store_true",
        help="print the settings FILE gives over the defaults, by key, as JSON (durations in "
        "seconds, sizes in bytes, --db without its password); flags and RUNSERVICE_* "
        "variables are not read",
    )
    check.set_defaults(handler=_config_check)


def _config_check(args: argparse.Namespace) -> int:
    try:
        values = config.read_config_file(args.file)
    except config.ConfigFileError as exc:
        _print_problems(exc.problems, args.json)
        return 1
    if not args.json:
        print(f"{args.file}: ok")
        return 0
    document = config.file_document(config.Settings(**values))
    if document["db"]:
        document["db"] = _without_password(document["db"])
    print(json.dumps(document, indent=2))
    return 0


def _print_problems(problems: list[str], as_json: bool) -> None:
    """A configuration file's problems on stderr: one line each, or one JSON error object
    whose `problems` lists them."""
    if as_json:
        error = {"code": "INVALID_ARGUMENT", "reason": "", "message": "; ".join(problems)}
        print(json.dumps({**error, "problems": problems}), file=sys.stderr, flush=True)
        return
    for line in problems:
        print(line, file=sys.stderr, flush=True)


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not shown: not a database URL, and it may hold a password)"


def _seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must not be negative (0 or 1 = from the start)")
    return value


MIN_INTERVAL_S = 0.1


def _interval(text: str) -> float:
    seconds = config.parse_duration(text)
    if seconds < MIN_INTERVAL_S:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least {MIN_INTERVAL_S:g}s")
    return seconds


def _fingerprint(text: str) -> str:
    if len(text) < FINGERPRINT_MIN or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give at least {FINGERPRINT_MIN} hex digits, as `tokens list` shows them"
        )
    return text


def _serve(args: argparse.Namespace) -> int:
    from runservice import logs, workers
    from runservice.app import serve

    try:
        settings = config.settings_from_args(args)
    except config.ConfigFileError as exc:
        _print_problems(exc.problems, as_json=False)
        return 1
    logs.configure(settings.log_level, settings.log_format, settings.worker_index)
    if settings.workers > 1 and settings.worker_index is None:
        return workers.serve(settings)
    ready = args.worker_ready_fd
    on_ready = None if ready is None else workers.ready_reporter(ready)
    loop = new_event_loop(settings.event_loop)
    try:
        return loop.run_until_complete(serve(settings, on_ready))
    finally:
        _close_loop(loop)


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A new event loop of `kind`: "uvloop" or "asyncio"."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _close_loop(loop: asyncio.AbstractEventLoop, limit: float = 2.0) -> None:
    """Closes the loop without waiting forever for agents that ignore cancellation.

    asyncio.run() would wait for every task, so one abandoned agent could keep the
    process from exiting after a clean shutdown.
    """
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        _, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=limit))
        if stuck:
            logging.getLogger("runservice").warning(
                "exiting with %d abandoned agent tasks that ignored cancellation", len(stuck)
            )
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


@contextlib.contextmanager
def _tokens_file_changes(path: Path) -> Iterator[None]:
    """A change to the tokens file whose refusals (a file that is not valid, one that
    cannot be written) are one-line CommandErrors."""
    from runservice.tokens import TokensFileError

    try:
        yield
    except TokensFileError as exc:
        raise CommandError("FAILED_PRECONDITION", f"{exc}; the file was left as it is") from None
    except OSError as exc:
        raise CommandError("FAILED_PRECONDITION", f"cannot write {path}: {exc.strerror}") from None


def _tokens_add(args: argparse.Namespace) -> int:
    from runservice.tokens import FINGERPRINT_LEN, add_token, hash_token

    with _tokens_file_changes(args.file):
        token = add_token(args.file, args.user, args.role)
    if args.json:
        fingerprint = hash_token(token)[:FINGERPRINT_LEN]
        entry = {"user": args.user, "roles": args.role, "fingerprint": fingerprint}
        print(json.dumps({**entry, "token": token}))
        return 0
    err.print(f"added a token for user [bold]{args.user}[/] to {args.file}; it is shown once:")
    print(token)
    return 0


def _tokens_list(args: argparse.Namespace) -> int:
    from runservice.tokens import TokensFileError, list_tokens

    try:
        entries = list_tokens(args.file)
    except TokensFileError as exc:
        raise CommandError("FAILED_PRECONDITION", str(exc)) from None
    if args.json:
        print(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
        return 0
    rows = [
        {
            "user": e.user,
            "roles": ",".join(e.roles),
            "fingerprint": e.fingerprint,
            "created": e.created or "",
        }
        for e in entries
    ]
    _print_rows(["user", "roles", "fingerprint", "created"], rows)
    return 0


def _tokens_revoke(args: argparse.Namespace) -> int:
    from runservice.tokens import TokenAmbiguousError, TokenNotFoundError, revoke_tokens

    try:
        with _tokens_file_changes(args.file):
            removed = revoke_tokens(
                args.file, user=args.user or "", fingerprint=args.fingerprint or ""
            )
    except TokenNotFoundError as exc:
        raise CommandError("NOT_FOUND", str(exc)) from None
    except TokenAmbiguousError as exc:
        raise CommandError("INVALID_ARGUMENT", str(exc)) from None
    if args.json:
        gone = [{"user": e.user, "fingerprint": e.fingerprint} for e in removed]
        print(json.dumps({"revoked": gone}))
        return 0
    names = ", ".join(f"{e.user} ({e.fingerprint})" for e in removed)
    plural = "token" if len(removed) == 1 else "tokens"
    print(f"revoked {len(removed)} {plural} in {args.file}: {names}")
    return 0


# -- client commands ------------------------------------------------------------------------


def _token(flag: str | None, addr: str) -> str | None:
    """--token, else RUNSERVICE_TOKEN, else (for a loopback address) the development token."""
    token = flag or os.environ.get("RUNSERVICE_TOKEN")
    if token:
        return token
    dev = config.default_data_dir() / "dev-token"
    if config.is_loopback(addr) and dev.exists():
        return dev.read_text().strip()
    return None


def _client(args: argparse.Namespace, run: Callable[..., Coroutine[Any, Any, int]]) -> int:
    from runservice.client import AsyncRunClient, RunServiceError

    addr = args.addr or os.environ.get("RUNSERVICE_ADDR") or DEFAULT_ADDR

    async def go() -> int:
        async with AsyncRunClient(addr, token=_token(args.token, addr)) as client:
            await _connect(client, addr, quiet=args.json and not err.is_terminal)
            return await run(client, args)

    try:
        return asyncio.run(go())
    except RunServiceError as exc:
        _print_error(exc.code.name, exc.reason, exc.message, args.json, show_code=True)
        return 1
    except KeyboardInterrupt:
        if _endless(args):
            return 0  # Ctrl-C is how `ls --watch` and `top` end
        raise
    except BrokenPipeError:
        if not _endless(args):
            raise
        # The reader of a stream went away (`ls --watch --json | head -3`): that ends it too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _endless(args: argparse.Namespace) -> bool:
    """True for the commands that run until Ctrl-C: `ls --watch` and `top` (not --once)."""
    top = getattr(args, "endless", False) and not (args.once or args.json)
    return bool(getattr(args, "watch", False) or top)


async def _connect(client: Any, addr: str, *, quiet: bool) -> None:
    """Returns once connected; says so on stderr while it waits, and raises UnavailableError
    naming `addr` when the server is not reached within CONNECT_LIMIT_S."""
    connected = asyncio.ensure_future(client.wait_connected(CONNECT_LIMIT_S))
    done, _ = await asyncio.wait({connected}, timeout=CONNECT_NOTICE_S)
    if not done and not quiet:
        err.print(f"connecting to {escape(addr)}...")
    await connected


def _as_dict(message: Any, *, defaults: bool = False) -> dict[str, Any]:
    """The message's proto JSON; with `defaults`, fields at 0, "" or false too."""
    from google.protobuf import json_format

    fields = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=defaults
    )
    order = [f.name for f in message.DESCRIPTOR.fields if f.name in fields]
    result: dict[str, Any] = whole_numbers({name: fields[name] for name in order})
    return result


def _state(run: Any) -> str:
    from runservice.v1 import run_pb2

    return str(run_pb2.RunState.Name(run.state)).removeprefix("RUN_STATE_")


def _print_run(run: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_as_dict(run), indent=2))
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("run_id", run.run_id)
    table.add_row("state", _state(run))
    table.add_row("agent", run.agent)
    table.add_row("owner", run.owner)
    if run.thread_id:
        table.add_row("thread", run.thread_id)
    table.add_row("created", run.create_time.ToDatetime().isoformat(timespec="seconds") + "Z")
    table.add_row("last_seq", str(run.last_seq))
    if run.waiting_for_input:
        table.add_row("waiting", "for input (runservice send)")
    if run.HasField("progress"):
        p = run.progress
        done = f"{p.done:g}" + (f" of {p.total:g}" if p.total else "")
        table.add_row("progress", escape(f"{done} {p.message}".strip()))
    if run.usage:
        table.add_row("usage", " ".join(f"{k}={v:g}" for k, v in sorted(run.usage.items())))
    if run.HasField("result"):
        table.add_row("result", json.dumps(_as_dict(run)["result"]))
    if run.HasField("error"):
        table.add_row("error", run.error.message)
    if run.stop_reason:
        table.add_row("stop_reason", run.stop_reason)
    if run.HasField("expire_time"):
        table.add_row("expires", run.expire_time.ToDatetime().isoformat(timespec="seconds") + "Z")
    out.print(table)


def _print_event(event: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_as_dict(event)), flush=True)
        return
    payload = ""
    kind = event.WhichOneof("payload")
    if kind == "text":
        payload = event.text
    elif kind == "data":
        payload = json.dumps(_as_dict(event)["data"])
    elif kind == "binary":
        payload = f"<{len(event.binary)} bytes>"
    payload = escape(payload)  # an agent's text is not rich markup
    if event.type == "run.state":
        payload = f"[bold]{_state(event)}[/] {payload}".rstrip()
        if event.HasField("error"):
            payload += f" ({escape(event.error.message)})"
    # One event per line, never wrapped: scripts and `grep` read these lines.
    line = f"[dim]{event.seq:>6}[/] [cyan]{escape(event.type)}[/] {payload}"
    out.print(line, soft_wrap=True)


def _json_object(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--input is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError("--input must be a JSON object")
    return data


async def _send(client: Any, args: argparse.Namespace) -> int:
    data = _json_object(args.input)
    event = await client.send_input(args.run_id, data, request_id=args.request_id or None)
    if args.json:
        print(json.dumps(_as_dict(event)), flush=True)
    else:
        err.print(f"sent input to {args.run_id} as event {event.seq}")
    return 0


async def _start(client: Any, args: argparse.Namespace) -> int:
    from runservice.v1 import run_pb2

    data = _json_object(args.input)
    labels = dict(item.split("=", 1) for item in args.label if "=" in item)
    strategy = run_pb2.MultitaskStrategy.Value("MULTITASK_STRATEGY_" + args.strategy.upper())
    run = await client.start_run(
        args.agent,
        data,
        thread_id=args.thread,
        labels=labels,
        timeout=args.timeout,
        request_id=args.request_id,
        multitask_strategy=strategy,
        retention=args.retention,
    )
    if not args.follow:
        if args.json:
            _print_run(run, True)
        else:
            print(run.run_id)
        return 0
    if not args.json:  # with --json, the events carry the run id
        err.print(f"run {run.run_id} started; Ctrl-C stops following (the run goes on)")
    return await _follow(client, run.run_id, 1, args.json)


async def _follow(client: Any, run_id: str, from_seq: int, as_json: bool) -> int:
    last = None
    async for event in client.subscribe(run_id, from_seq=from_seq):
        _print_event(event, as_json)
        last = event
    return 0 if last is None or last.state in (0, 3) else 1


async def _get(client: Any, args: argparse.Namespace) -> int:
    _print_run(await client.get_run(args.run_id), args.json)
    return 0


async def _ls(client: Any, args: argparse.Namespace) -> int:
    from runservice.v1 import run_pb2

    try:
        states = [run_pb2.RunState.Value("RUN_STATE_" + s.upper()) for s in args.state]
    except ValueError:
        raise UsageError(
            "--state takes PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, INTERRUPTED or TIMED_OUT"
        ) from None
    filters = {
        "states": states,
        "agent": args.agent,
        "thread_id": args.thread,
        "all_users": args.all_users,
    }
    if args.watch:
        return await _ls_watch(client, filters, args)
    runs = [
        run
        async for run in client.list_runs(
            limit=args.limit, page_size=min(args.limit, 1000), **filters
        )
    ]
    if args.json:
        print(json.dumps([_as_dict(r) for r in runs], indent=2))
        return 0
    rows = [_run_row(run) for run in runs]
    if not out.is_terminal:
        _print_rows(list(_LS_LAYOUT.columns), rows)
    else:
        out.print(_runs_table(rows, out.width))
    return 0


def _run_row(run: Any, last_seq: int | None = None) -> dict[str, str]:
    """A run as a row of the `ls` table (`last_seq` when a fresher one is known)."""
    return {
        "run_id": run.run_id,
        "state": _state(run),
        "agent": run.agent,
        "owner": run.owner,
        "created": run.create_time.ToDatetime().isoformat(timespec="seconds") + "Z",
        "last_seq": str(run.last_seq if last_seq is None else last_seq),
    }


def _print_rows(columns: list[str], rows: list[dict[str, str]]) -> None:
    """A table as a terminal shows it, or, piped, tab-separated whole values under a header
    line (no box characters, nothing cut)."""
    if not out.is_terminal:
        for values in (columns, *([row[c] for c in columns] for row in rows)):
            print("\t".join(values))
        return
    table = Table()
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(escape(row[c]) for c in columns))
    out.print(table)


@dataclass(frozen=True)
class _Layout:
    """The columns of a table of runs and how it fits a terminal's width: `whole` columns
    are never cut (run ids are copied into other commands), `droppable` ones are left out,
    in this order, while the table would not fit, and agent and owner are cut (ending in
    "…") to what is left."""

    columns: tuple[str, ...]
    whole: frozenset[str]
    droppable: tuple[str, ...]
    right: frozenset[str]


_LS_LAYOUT = _Layout(
    ("run_id", "state", "agent", "owner", "created", "last_seq"),
    whole=frozenset({"run_id", "state", "last_seq"}),
    droppable=("created",),
    right=frozenset({"last_seq"}),
)
_TOP_LAYOUT = _Layout(
    ("run_id", "state", "agent", "owner", "age", "last_seq", "ev/s"),
    whole=frozenset({"run_id", "state", "last_seq", "ev/s"}),
    droppable=("age",),
    right=frozenset({"age", "last_seq", "ev/s"}),
)
_SHORTENED = ("agent", "owner")
_GAP = 2  # the space between two columns of the table below


def _runs_table(rows: list[dict[str, str]], width: int) -> Table:
    """The `ls` table fitted to `width`: without `created` when it would not fit, and with
    agent and owner cut (ending in "…") to what is left."""
    return _fitted_table(rows, width, _LS_LAYOUT)


def _fitted_table(
    rows: list[dict[str, str]], width: int, layout: _Layout, styles: list[str] | None = None
) -> Table:
    """A table of `rows` fitted to `width` as `layout` says; `styles` styles each row."""
    columns = list(layout.columns)
    natural = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in columns}
    for droppable in layout.droppable:
        if sum(natural[c] for c in columns) + _GAP * (len(columns) - 1) <= width:
            break
        columns.remove(droppable)
    fixed = sum(natural[c] for c in columns if c not in _SHORTENED)
    spare = width - fixed - _GAP * (len(columns) - 1)
    owner = min(natural["owner"], max(len("owner"), spare - natural["agent"], spare // 2))
    limits = {"owner": owner, "agent": max(len("agent"), spare - owner)}
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for c in columns:
        shortened = c in _SHORTENED and natural[c] > limits[c]
        table.add_column(
            c,
            no_wrap=True,
            overflow="ellipsis",
            min_width=natural[c] if c in layout.whole else None,
            max_width=limits[c] if shortened else None,
            justify="right" if c in layout.right else "left",
        )
    for i, row in enumerate(rows):
        table.add_row(*(escape(row[c]) for c in columns), style=styles[i] if styles else None)
    return table


async def _stop(client: Any, args: argparse.Namespace) -> int:
    _print_run(await client.stop_run(args.run_id, args.reason), args.json)
    return 0


async def _rm(client: Any, args: argparse.Namespace) -> int:
    await client.delete_run(args.run_id)
    if args.json:
        print(json.dumps({"run_id": args.run_id, "deleted": True}))
    else:
        err.print(f"deleted {args.run_id}")
    return 0


async def _tail(client: Any, args: argparse.Namespace) -> int:
    return await _follow(client, args.run_id, args.from_seq, args.json)


async def _agents(client: Any, args: argparse.Namespace) -> int:
    agents = await client.list_agents()
    if args.json:
        print(json.dumps([_as_dict(a) for a in agents], indent=2))
        return 0
    rows = [{"agent": a.name, "description": a.description} for a in agents]
    _print_rows(["agent", "description"], rows)
    return 0


# -- live views: `ls --watch` and `top` -----------------------------------------------------

FINISHED_LINGER_S = 30.0  # a finished run the filter does not ask for stays this long
WATCH_REFRESH_S = 1.0  # how often `ls --watch` reads its active runs' last_seq
_STATUS_LINES = 2  # below a live table: its status line, and a line to spare
_TABLE_HEAD = 2  # a table's header and the rule under it
_REOPEN_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"})
_TRANSPORT_CODES = frozenset({"INTERNAL", "UNKNOWN", "CANCELLED"})


def _active_states() -> frozenset[int]:
    from runservice.v1 import run_pb2

    return frozenset({run_pb2.RUN_STATE_PENDING, run_pb2.RUN_STATE_RUNNING})


def _change(update: Any) -> str:
    from runservice.v1 import run_service_pb2

    return str(run_service_pb2.RunChange.Name(update.change)).removeprefix("RUN_CHANGE_")


def _reopens(exc: Any) -> bool:
    """True for a watch or a poll that broke for a reason that passes: the watch lagged,
    the connection dropped, the server is restarting."""
    code = exc.code.name
    return code in _REOPEN_CODES or (code in _TRANSPORT_CODES and not exc.reason)


def _why(exc: Any) -> str:
    if exc.reason == "WATCH_LAGGED":
        return "the watch fell behind the changes (WATCH_LAGGED)"
    return f"lost the connection ({exc.code.name})"


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S")


async def _ls_watch(client: Any, filters: dict[str, Any], args: argparse.Namespace) -> int:
    """`ls --watch`: a live table on a terminal, else one line (or JSON object) per change.
    Runs until Ctrl-C."""
    if args.json:
        await _follow_watch(client, filters, _JsonChanges(quiet=not err.is_terminal))
    elif not out.is_terminal:
        await _follow_watch(client, filters, _PlainChanges())
    else:
        # Drawn from the first answer on: a refusal is one line, not a table and a line.
        live = Live(console=out, auto_refresh=False)
        screen = _WatchScreen(client, filters, args.limit, live)
        refresher = asyncio.ensure_future(screen.keep_fresh())
        try:
            await _follow_watch(client, filters, screen)
        finally:
            refresher.cancel()
            await asyncio.wait({refresher})
            live.stop()
    return 0


async def _follow_watch(client: Any, filters: dict[str, Any], sink: Any) -> None:
    """Gives `sink` every change of the watch, for ever: when the watch lags, the
    connection drops or the server ends it (a restart), it is opened again, after a
    backoff, and starts over with a fresh snapshot. Raises the errors that do not pass."""
    from runservice.client import RunServiceError

    attempt = 0
    while True:
        try:
            async for update in client.watch_runs(**filters):
                attempt = 0
                sink.change(update)
            why = "the server ended the watch"
        except RunServiceError as exc:
            if not _reopens(exc):
                raise
            why = _why(exc)
        attempt += 1
        sink.reopening(why)
        await asyncio.sleep(client.retry.backoff(attempt))


class _JsonChanges:
    """`ls --watch --json`: each change as one JSON object on its own line."""

    def __init__(self, *, quiet: bool) -> None:
        self._quiet = quiet

    def change(self, update: Any) -> None:
        print(json.dumps(_as_dict(update)), flush=True)

    def reopening(self, why: str) -> None:
        if not self._quiet:
            err.print(f"{escape(why)}; reopening the watch (a fresh snapshot follows)")


class _PlainChanges:
    """`ls --watch` piped: a header once the watch answers, then one tab-separated line per
    change of a run."""

    COLUMNS = ("change", "run_id", "state", "agent", "owner", "last_seq")

    def __init__(self) -> None:
        self._header_due = True

    def change(self, update: Any) -> None:
        if self._header_due:
            print("\t".join(self.COLUMNS), flush=True)
            self._header_due = False
        if not update.HasField("run"):
            return  # the end of the snapshot: no run to show
        row = {"change": _change(update), **_run_row(update.run)}
        print("\t".join(row[c] for c in self.COLUMNS), flush=True)

    def reopening(self, why: str) -> None:
        err.print(f"{escape(why)}; reopening the watch (a fresh snapshot follows)")


@dataclass
class _Row:
    """A run `ls --watch` shows: the run as last reported, the highest last_seq seen,
    and when it was seen finished (monotonic seconds)."""

    run: Any
    seq: int
    ended: float | None = None


class _WatchTable:
    """The runs a watch reported, newest first. A finished run that the filter does not ask
    for (with no --state: any finished run) stays FINISHED_LINGER_S, and is the first to go
    when the table is full."""

    def __init__(self, wanted: frozenset[int]) -> None:
        self.rows: dict[str, _Row] = {}
        self._wanted = wanted
        self._snapshot: set[str] | None = set()

    def begin_snapshot(self) -> None:
        """A new watch is opening: the changes that follow are its snapshot."""
        self._snapshot = set()

    def apply(self, update: Any, now: float) -> list[str]:
        """Applies a change. At the end of a snapshot, returns the ids of the active runs
        it left out: they ended or went away while no watch was open."""
        change = _change(update)
        if change == "SNAPSHOT_END":
            seen, self._snapshot = self._snapshot or set(), None
            active = _active_states()
            return [i for i, r in self.rows.items() if i not in seen and r.run.state in active]
        if change == "DELETED":
            self.rows.pop(update.run.run_id, None)
        else:
            self.put(update.run, now)
            if self._snapshot is not None:
                self._snapshot.add(update.run.run_id)
        return []

    def put(self, run: Any, now: float) -> None:
        """Shows `run` as it is now; its last_seq never goes back."""
        row = self.rows.get(run.run_id)
        if row is None:
            row = self.rows[run.run_id] = _Row(run, run.last_seq)
        row.run, row.seq = run, max(row.seq, run.last_seq)
        if row.ended is None and run.state not in _active_states():
            row.ended = now

    def progress(self, run: Any) -> None:
        """Takes a fresher last_seq of a run shown (its state comes from the watch)."""
        row = self.rows.get(run.run_id)
        if row is not None:
            row.seq = max(row.seq, run.last_seq)

    def drop(self, run_id: str) -> None:
        """Forgets a run that no longer exists."""
        self.rows.pop(run_id, None)

    def visible(self, now: float, capacity: int) -> tuple[list[_Row], int]:
        """The newest rows that fit `capacity`, and how many more there are; finished runs
        whose time is up go first."""
        for run_id, row in list(self.rows.items()):
            if self._lingering(row) and now - (row.ended or now) > FINISHED_LINGER_S:
                del self.rows[run_id]
        excess = len(self.rows) - capacity
        lingering = sorted((r for r in self.rows.values() if self._lingering(r)), key=_ended)
        for row in lingering[: max(excess, 0)]:
            del self.rows[row.run.run_id]
        ordered = sorted(self.rows.values(), key=lambda r: str(r.run.run_id), reverse=True)
        return ordered[:capacity], max(len(ordered) - capacity, 0)

    def _lingering(self, row: _Row) -> bool:
        return row.ended is not None and row.run.state not in self._wanted


def _ended(row: _Row) -> float:
    return row.ended or 0.0


class _WatchScreen:
    """`ls --watch` on a terminal: the watch's changes drawn as a live table that fits the
    terminal, with a status line; the active runs' last_seq read every WATCH_REFRESH_S."""

    def __init__(self, client: Any, filters: dict[str, Any], limit: int, live: Live) -> None:
        self._client = client
        self._filters = filters
        self._limit = max(limit, 1)
        self._live = live
        self._progress_states = sorted(
            _active_states() & set(filters["states"] or _active_states())
        )
        self._table = _WatchTable(frozenset(filters["states"]) or _active_states())
        self._stale: set[str] = set()
        self._snapshotting = True
        self._note = "opening the watch..."
        self._broken = ""

    def change(self, update: Any) -> None:
        """A change of the watch."""
        self._stale.update(self._table.apply(update, time.monotonic()))
        if _change(update) == "SNAPSHOT_END":
            self._snapshotting = False
            self._note = f"watching since {_clock()}"
            if self._broken:
                self._note = f"reopened the watch at {_clock()} after: {self._broken}"
                self._broken = ""
        if not self._snapshotting:
            self.draw()

    def reopening(self, why: str) -> None:
        """The watch broke: say so; a fresh snapshot follows."""
        self._table.begin_snapshot()
        self._snapshotting = True
        self._broken = why
        self._note = f"{why}; reopening the watch..."
        self.draw()

    async def keep_fresh(self) -> None:
        """Every WATCH_REFRESH_S: the shown runs' last_seq, what became of the runs that were
        active while no watch was open, then a redraw (finished runs leave on time)."""
        from runservice.client import NotFoundError, RunServiceError

        while True:
            await asyncio.sleep(WATCH_REFRESH_S)
            try:
                for run_id in sorted(self._stale):
                    try:
                        self._table.put(await self._client.get_run(run_id), time.monotonic())
                    except NotFoundError:
                        self._table.drop(run_id)
                    self._stale.discard(run_id)
                await self._read_progress()
            except RunServiceError:
                pass  # the connection's trouble shows on the status line, through the watch
            if not self._snapshotting:
                self.draw()

    async def _read_progress(self) -> None:
        active = _active_states()
        if not self._progress_states or not any(
            r.run.state in active for r in self._table.rows.values()
        ):
            return
        capacity = self._capacity()
        filters = {**self._filters, "states": self._progress_states}
        async for run in self._client.list_runs(page_size=capacity, limit=capacity, **filters):
            self._table.progress(run)

    def _capacity(self) -> int:
        return max(1, min(self._limit, out.size.height - _TABLE_HEAD - _STATUS_LINES))

    def draw(self) -> None:
        """Redraws the table now."""
        rows, hidden = self._table.visible(time.monotonic(), self._capacity())
        active = _active_states()
        styles = ["" if r.run.state in active else "dim" for r in rows]
        table = _fitted_table([_run_row(r.run, r.seq) for r in rows], out.width, _LS_LAYOUT, styles)
        running = sum(r.run.state in active for r in rows)
        shown = f"{len(rows)} runs ({running} active)" + (f", {hidden} more" if hidden else "")
        status = Text(f"{shown} · {self._note} · Ctrl-C quits", style="dim")
        status.no_wrap, status.overflow = True, "ellipsis"
        self._live.start()  # once; later calls do nothing
        self._live.update(Group(table, status), refresh=True)


# `top`


@dataclass(frozen=True)
class _Sample:
    """What `top` read at one moment: the server's stats, its active runs (newest first),
    and when (monotonic seconds, here)."""

    stats: Any
    runs: list[Any]
    at: float
    cut: bool = False  # more runs are active than `runs` holds


@dataclass(frozen=True)
class _Rates:
    """Rates between two samples of one process; None where they cannot be measured."""

    events: float | None = None
    commits: float | None = None
    per_commit: float | None = None
    runs: dict[str, float] = field(default_factory=dict)


_TOP_FIXED_LINES = 6  # the stats block above the runs table, blank line included
TOP_JSON_RUNS = 50  # active runs a --once/--json sample lists


async def _top(client: Any, args: argparse.Namespace) -> int:
    """`top`: samples GetServerStats and the active runs every --interval."""
    first = await _top_sample(client, _top_capacity(args))
    if args.once or args.json:
        await asyncio.sleep(args.interval)
        sample = await _top_sample(client, _top_capacity(args))
        _print_top_once(client.address, sample, _rates(first, sample), args)
        return 0
    if not out.is_terminal:
        await _top_lines(client, first, args)
    else:
        with Live(console=out, screen=True, auto_refresh=False) as live:
            await _top_live(client, first, live, args)
    return 0


def _top_capacity(args: argparse.Namespace) -> int:
    """How many active runs a sample lists: what fits the terminal, or TOP_JSON_RUNS."""
    if args.once or args.json or not out.is_terminal:
        return TOP_JSON_RUNS
    return max(1, out.size.height - _TOP_FIXED_LINES - _TABLE_HEAD - _STATUS_LINES)


async def _top_sample(client: Any, capacity: int) -> _Sample:
    """One sample; a refusal of the stats (not an admin) says what to do."""
    from runservice.client import PermissionDeniedError

    try:
        stats = await client.server_stats()
    except PermissionDeniedError as exc:
        raise PermissionDeniedError(
            f"{exc.message}; run `runservice top` with an admin's token (--token or "
            "RUNSERVICE_TOKEN)",
            reason=exc.reason,
            metadata=exc.metadata,
        ) from None
    listed = client.list_runs(
        states=sorted(_active_states()), all_users=True, page_size=capacity, limit=capacity
    )
    runs = [run async for run in listed]
    return _Sample(stats, runs, asyncio.get_running_loop().time(), cut=len(runs) >= capacity)


def _seconds(duration: Any) -> float:
    return float(duration.seconds + duration.nanos / 1e9)


def _same_process(a: Any, b: Any) -> bool:
    return bool(a.pid == b.pid and a.hostname == b.hostname and a.start_time == b.start_time)


def _rates(before: _Sample | None, now: _Sample) -> _Rates:
    """The rates from `before` to `now`: the server's over its own uptime, the runs' over
    the time between the two reads."""
    if before is None or not _same_process(before.stats, now.stats):
        return _Rates()
    elapsed = _seconds(now.stats.uptime) - _seconds(before.stats.uptime)
    if elapsed <= 0:
        return _Rates()
    events = now.stats.events_committed - before.stats.events_committed
    commits = now.stats.commits - before.stats.commits
    seqs = {run.run_id: run.last_seq for run in before.runs}
    between = max(now.at - before.at, 1e-9)
    return _Rates(
        events=events / elapsed,
        commits=commits / elapsed,
        per_commit=events / commits if commits else None,
        runs={
            run.run_id: (run.last_seq - seqs[run.run_id]) / between
            for run in now.runs
            if run.run_id in seqs
        },
    )


async def _top_live(client: Any, sample: _Sample, live: Live, args: argparse.Namespace) -> None:
    """The live screen, redrawn every --interval until Ctrl-C. While the server cannot be
    reached the last figures stay, and the status line says so."""
    from runservice.client import RunServiceError

    loop = asyncio.get_running_loop()
    rates, note = _Rates(), ""
    while True:
        live.update(_top_screen(client.address, sample, rates, note, args.interval), refresh=True)
        await asyncio.sleep(max(0.0, args.interval - (loop.time() - sample.at)))
        try:
            fresh = await _top_sample(client, _top_capacity(args))
        except RunServiceError as exc:
            if not _reopens(exc):
                raise
            note = f"cannot read the server at {_clock()} ({exc.code.name}); retrying"
            continue
        if not _same_process(sample.stats, fresh.stats):
            note = f"another process answered at {_clock()} (pid {fresh.stats.pid})"
        elif note:
            note = ""
        rates, sample = _rates(sample, fresh), fresh


def _rate(value: float | None, grouped: bool = True) -> str:
    """A rate with one decimal ("-": not measured yet); grouped in thousands for people."""
    if value is None:
        return "-"
    return f"{value:,.1f}" if grouped else f"{value:.1f}"


def _span(seconds: float) -> str:
    """A duration in its two largest units: 45s, 3m04s, 2h05m, 3d04h."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _top_stats_lines(addr: str, stats: Any, rates: _Rates) -> list[str]:
    """The figures of the top screen, one group a line."""
    who = f"pid {stats.pid}@{stats.hostname}"
    if stats.replica:
        who += f" replica {stats.replica[:12]}"
    store = f"not taking writes: {stats.store_problem}" if stats.store_problem else "ok"
    return [
        f"runservice top · {addr} · {who} · version {stats.version} · "
        f"up {_span(_seconds(stats.uptime))}",
        f"runs     active {stats.active_runs}   queued {stats.queued_runs}   "
        f"in memory {stats.runs_in_memory}",
        f"events   {_rate(rates.events)}/s   commits {_rate(rates.commits)}/s   "
        f"{_rate(rates.per_commit)} events/commit   pending {stats.pending_events}",
        f"streams  subscriptions {stats.subscriptions}   lag {stats.subscriber_lag_events} "
        f"events (max {stats.max_subscriber_lag_events})   watches {stats.watches}",
        f"store    {store}   draining {'yes' if stats.draining else 'no'}",
    ]


def _top_rows(sample: _Sample, rates: _Rates) -> list[dict[str, str]]:
    """The rows of top's table: each active run with its age and its events/s."""
    now = time.time()
    rows = []
    for run in sample.runs:
        started = _seconds(run.start_time)  # 0 while it waits to start
        row = _run_row(run)
        row["age"] = _span(now - started) if started else "-"
        row["ev/s"] = _rate(rates.runs.get(run.run_id))
        rows.append(row)
    return rows


def _top_screen(addr: str, sample: _Sample, rates: _Rates, note: str, interval: float) -> Group:
    """The top screen: the figures, the active runs that fit, a status line."""
    lines = [
        Text(line, no_wrap=True, overflow="ellipsis")
        for line in _top_stats_lines(addr, sample.stats, rates)
    ]
    lines[0].stylize("bold")
    table = _fitted_table(_top_rows(sample, rates), out.width, _TOP_LAYOUT)
    listed = f"{len(sample.runs)} active runs listed"
    if sample.cut:
        listed += " (the newest that fit)"
    status = note or f"sampled at {_clock()}, every {interval:g}s"
    footer = Text(
        f"{listed} · {status} · Ctrl-C quits", style="dim", no_wrap=True, overflow="ellipsis"
    )
    return Group(*lines, Text(""), table, footer)


def _print_top_once(addr: str, sample: _Sample, rates: _Rates, args: argparse.Namespace) -> None:
    """`top --once` / `--json`: one sample, measured over --interval."""
    if args.json:
        document = {
            "stats": _as_dict(sample.stats, defaults=True),
            "rates": {
                "interval_seconds": args.interval,
                "events_per_second": _rounded(rates.events),
                "commits_per_second": _rounded(rates.commits),
                "events_per_commit": _rounded(rates.per_commit),
                "runs_events_per_second": {k: _rounded(v) for k, v in rates.runs.items()},
            },
            "runs": [_as_dict(run) for run in sample.runs],
        }
        print(json.dumps(document, indent=2))
        return
    for line in _top_stats_lines(addr, sample.stats, rates):
        out.print(line, soft_wrap=True, markup=False)
    print()
    rows = _top_rows(sample, rates)
    if out.is_terminal:
        out.print(_fitted_table(rows, out.width, _TOP_LAYOUT))
    else:
        _print_rows(list(_TOP_LAYOUT.columns), rows)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


_TOP_LINE_COLUMNS = (
    "time",
    "active",
    "queued",
    "in_memory",
    "events_per_s",
    "commits_per_s",
    "subscriptions",
    "lag",
    "max_lag",
    "watches",
    "pending",
    "draining",
    "store_problem",
)


async def _top_lines(client: Any, sample: _Sample, args: argparse.Namespace) -> None:
    """`top` piped: a header, then one tab-separated line per --interval, like vmstat."""
    from runservice.client import RunServiceError

    loop = asyncio.get_running_loop()
    print("\t".join(_TOP_LINE_COLUMNS), flush=True)
    before: _Sample | None = None
    while True:
        print("\t".join(_top_line(sample, _rates(before, sample))), flush=True)
        await asyncio.sleep(max(0.0, args.interval - (loop.time() - sample.at)))
        try:
            before, sample = sample, await _top_sample(client, 1)
        except RunServiceError as exc:
            if not _reopens(exc):
                raise
            err.print(f"cannot read the server ({exc.code.name}: {escape(exc.message)}); retrying")


def _top_line(sample: _Sample, rates: _Rates) -> list[str]:
    s = sample.stats
    figures = (
        s.active_runs,
        s.queued_runs,
        s.runs_in_memory,
        _rate(rates.events, grouped=False),
        _rate(rates.commits, grouped=False),
        s.subscriptions,
        s.subscriber_lag_events,
        s.max_subscriber_lag_events,
        s.watches,
        s.pending_events,
        "yes" if s.draining else "no",
        s.store_problem,
    )
    return [_clock(), *(str(f) for f in figures)]


if __name__ == "__main__":
    sys.exit(main())
