"""The `runservice` command: the server, token management, and client commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, NoReturn

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from runservice import config

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


def _version() -> str:
    try:
        return importlib.metadata.version("runservice")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="runservice",
        description="Run long jobs on the server and follow their event logs from anywhere.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
    ls.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    ls.add_argument("--all-users", action="store_true", help="every user's runs (admin)")

    stop = client_command("stop", "stop a run", _stop)
    stop.add_argument("run_id")
    stop.add_argument("--reason", default="", help="why; recorded on the run")

    rm = client_command("rm", "delete a finished run and its log", _rm)
    rm.add_argument("run_id")

    tail = client_command("tail", "print a run's events, then follow it until it ends", _tail)
    tail.add_argument("run_id")
    tail.add_argument(
        "--from-seq", type=_seq, default=1, help="first seq to print, 0 or more (default 1)"
    )

    client_command("agents", "list the agents the server runs", _agents)
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


async def _connect(client: Any, addr: str, *, quiet: bool) -> None:
    """Returns once connected; says so on stderr while it waits, and raises UnavailableError
    naming `addr` when the server is not reached within CONNECT_LIMIT_S."""
    connected = asyncio.ensure_future(client.wait_connected(CONNECT_LIMIT_S))
    done, _ = await asyncio.wait({connected}, timeout=CONNECT_NOTICE_S)
    if not done and not quiet:
        err.print(f"connecting to {escape(addr)}...")
    await connected


def _as_dict(message: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    result: dict[str, Any] = _whole_numbers(
        json_format.MessageToDict(message, preserving_proto_field_name=True)
    )
    return result


def _whole_numbers(value: Any) -> Any:
    """JSON numbers arrive as floats (google.protobuf.Value); show 2.0 as 2."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


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
    if run.HasField("result"):
        table.add_row("result", json.dumps(_as_dict(run)["result"]))
    if run.HasField("error"):
        table.add_row("error", run.error.message)
    if run.stop_reason:
        table.add_row("stop_reason", run.stop_reason)
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


async def _start(client: Any, args: argparse.Namespace) -> int:
    from runservice.v1 import run_pb2

    try:
        data = json.loads(args.input)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--input is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError("--input must be a JSON object")
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
    runs = [
        run
        async for run in client.list_runs(
            limit=args.limit,
            page_size=min(args.limit, 1000),
            states=states,
            agent=args.agent,
            thread_id=args.thread,
            all_users=args.all_users,
        )
    ]
    if args.json:
        print(json.dumps([_as_dict(r) for r in runs], indent=2))
        return 0
    rows = [
        {
            "run_id": run.run_id,
            "state": _state(run),
            "agent": run.agent,
            "owner": run.owner,
            "created": run.create_time.ToDatetime().isoformat(timespec="seconds") + "Z",
            "last_seq": str(run.last_seq),
        }
        for run in runs
    ]
    columns = ["run_id", "state", "agent", "owner", "created", "last_seq"]
    if not out.is_terminal:
        _print_rows(columns, rows)
    else:
        out.print(_runs_table(rows, out.width))
    return 0


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


# Columns of the `ls` table: what a narrow terminal keeps whole, gives up first, or shortens.
_WHOLE = ("run_id", "state", "last_seq")  # run ids are copied into other commands
_DROPPABLE = "created"
_SHORTENED = ("agent", "owner")
_GAP = 2  # the space between two columns of the table below


def _runs_table(rows: list[dict[str, str]], width: int) -> Table:
    """The `ls` table fitted to `width`: without `created` when it would not fit, and with
    agent and owner cut (ending in "…") to what is left."""
    columns = ["run_id", "state", "agent", "owner", _DROPPABLE, "last_seq"]
    natural = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in columns}
    if sum(natural.values()) + _GAP * (len(columns) - 1) > width:
        columns.remove(_DROPPABLE)
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
            min_width=natural[c] if c in _WHOLE else None,
            max_width=limits[c] if shortened else None,
            justify="right" if c == "last_seq" else "left",
        )
    for row in rows:
        table.add_row(*(escape(row[c]) for c in columns))
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


if __name__ == "__main__":
    sys.exit(main())
