"""The `runservice` command: the server, token management, and client commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from runservice import config

DEFAULT_ADDR = "127.0.0.1:50051"

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `runservice` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runservice",
        description="Run long jobs on the server and follow their event logs from anywhere.",
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server")
    config.add_serve_arguments(serve)
    serve.set_defaults(handler=_serve)

    tokens = sub.add_parser("tokens", help="manage the tokens file")
    tokens_sub = tokens.add_subparsers(metavar="ACTION")
    add = tokens_sub.add_parser("add", help="add a token; prints it as the last line")
    add.add_argument("--file", type=Path, required=True, help="the tokens file (TOML)")
    add.add_argument("--user", required=True, help="the user the token authenticates")
    add.add_argument("--role", action="append", default=[], help="a role, e.g. admin; repeatable")
    add.set_defaults(handler=_tokens_add)

    def client_command(
        name: str, help: str, run: Callable[..., Coroutine[Any, Any, int]]
    ) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help)
        cmd.add_argument(
            "--addr",
            default=None,
            help=f"server address (env RUNSERVICE_ADDR; default {DEFAULT_ADDR})",
        )
        cmd.add_argument("--json", action="store_true", help="print JSON instead of tables")
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
    tail.add_argument("--from-seq", type=int, default=1, help="first seq to print (default 1)")

    client_command("agents", "list the agents the server runs", _agents)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from runservice import workers
    from runservice.app import serve

    settings = config.settings_from_args(args)
    # A worker's lines go to its parent's stderr, among its peers': each says whose it is.
    who = "" if settings.worker_index is None else f"[worker {settings.worker_index}] "
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s",
    )
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


def _tokens_add(args: argparse.Namespace) -> int:
    from runservice.tokens import TokensFileError, add_token

    try:
        token = add_token(args.file, args.user, args.role)
    except TokensFileError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}; the file was left as it is")
        return 1
    except OSError as exc:
        err.print(f"[red]error:[/] cannot write {escape(str(args.file))}: {exc.strerror}")
        return 1
    err.print(f"added a token for user [bold]{args.user}[/] to {args.file}; it is shown once:")
    print(token)
    return 0


# -- client commands ------------------------------------------------------------------------


def _token(addr: str) -> str | None:
    token = os.environ.get("RUNSERVICE_TOKEN")
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
        async with AsyncRunClient(addr, token=_token(addr)) as client:
            return await run(client, args)

    try:
        return asyncio.run(go())
    except RunServiceError as exc:
        err.print(f"[red]error:[/] {exc.code.name}: {escape(exc.message)}")
        return 1
    except KeyboardInterrupt:
        return 130


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
    if event.type == "run.state":
        payload = f"[bold]{_state(event)}[/] {payload}".rstrip()
        if event.HasField("error"):
            payload += f" ({event.error.message})"
    out.print(f"[dim]{event.seq:>6}[/] [cyan]{event.type}[/] {payload}")


async def _start(client: Any, args: argparse.Namespace) -> int:
    from runservice.v1 import run_pb2

    try:
        data = json.loads(args.input)
    except json.JSONDecodeError as exc:
        err.print(f"[red]error:[/] --input is not JSON: {escape(str(exc))}")
        return 2
    if not isinstance(data, dict):
        err.print("[red]error:[/] --input must be a JSON object")
        return 2
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
        err.print(
            "[red]error:[/] --state takes PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, "
            "INTERRUPTED or TIMED_OUT"
        )
        return 2
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
    columns = ("run_id", "state", "agent", "owner", "created", "last_seq")
    rows = [
        (
            run.run_id,
            _state(run),
            run.agent,
            run.owner,
            run.create_time.ToDatetime().isoformat(timespec="seconds") + "Z",
            str(run.last_seq),
        )
        for run in runs
    ]
    if not out.is_terminal:  # piped: whole values, one run per line, tab-separated
        for row in (columns, *rows):
            print("\t".join(row))
        return 0
    table = Table()
    for column in columns:
        # Run ids are copied into other commands: never shorten them.
        table.add_column(column, no_wrap=column in ("run_id", "state", "created"))
    for row in rows:
        table.add_row(*row)
    out.print(table)
    return 0


async def _stop(client: Any, args: argparse.Namespace) -> int:
    _print_run(await client.stop_run(args.run_id, args.reason), args.json)
    return 0


async def _rm(client: Any, args: argparse.Namespace) -> int:
    await client.delete_run(args.run_id)
    err.print(f"deleted {args.run_id}")
    return 0


async def _tail(client: Any, args: argparse.Namespace) -> int:
    return await _follow(client, args.run_id, args.from_seq, args.json)


async def _agents(client: Any, args: argparse.Namespace) -> int:
    agents = await client.list_agents()
    if args.json:
        print(json.dumps([_as_dict(a) for a in agents], indent=2))
        return 0
    table = Table()
    table.add_column("agent")
    table.add_column("description")
    for agent in agents:
        table.add_row(agent.name, agent.description)
    out.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
