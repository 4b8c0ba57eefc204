"""Server settings: every option is a `runservice serve` flag, a RUNSERVICE_* variable and a
key of the configuration file (--config), in that order of precedence.

Parsed once, here. Durations are written like `30s`, `5m`, `7d`; sizes like `4MiB`.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    None: 1,
}


def parse_duration(text: str) -> float:
    """Seconds in `text` (`250ms`, `30s`, `5m`, `2h`, `7d`, or a bare number of seconds)."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 5m or 7d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(text: str) -> int:
    """Bytes in `text` (`4MiB`, `512KiB`, `1000`)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4MiB or 512KiB")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _SIZE_UNITS[unit]


LOG_LEVELS = ("debug", "info", "warning", "error")


LOG_FORMATS = ("text", "json")


EVENT_LOOPS = ("uvloop", "asyncio")


def _at_least(least: float) -> Any:
    """A parser of durations of at least `least` seconds."""

    def parse(text: str) -> float:
        seconds = parse_duration(text)
        if seconds < least:
            raise argparse.ArgumentTypeError(f"{text!r} is shorter than {least:g}s")
        return seconds

    return parse


MAX_RETENTION_CEILING = "36600d"
"""The most --max-retention may be (about a century): expiry times stay far from the
largest date the server can represent."""


def _duration_between(least: float, most: str) -> Any:
    """A parser of durations from `least` seconds to the duration `most`."""

    def parse(text: str) -> float:
        seconds = parse_duration(text)
        if seconds < least:
            raise argparse.ArgumentTypeError(f"{text!r} is shorter than {least:g}s")
        if seconds > parse_duration(most):
            raise argparse.ArgumentTypeError(f"{text!r} is longer than {most}")
        return seconds

    return parse


def http_url(text: str) -> str:
    """`text`, when it is an http or https URL with a host; else ArgumentTypeError."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - parsed for its ValueError on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http or https URL, like https://hooks.example.com/runs"
        )
    return text


def _count(least: int) -> Any:
    """A parser of whole numbers of at least `least`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below the least allowed, {least}")
        return value

    return parse


def _choice(value: str, choices: tuple[str, ...]) -> str:
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(choices)}")
    return value.lower()


class _OneOf:
    """A parser of one of `choices`, in any case; a word, so never a number in a file."""

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def __call__(self, text: str) -> str:
        return _choice(text, self.choices)


class AddressError(ValueError):
    """An address option (--http-listen, --metrics-listen) is not HOST:PORT."""


def host_port(address: str, flag: str, example: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT (`[::1]:8080` too); AddressError, naming `flag` and showing
    `example`, if it is not one."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:  # noqa: PLR2004
        raise AddressError(f"{flag} must be HOST:PORT, like {example} (got {address!r})")
    return host, int(port)


def is_loopback(address: str) -> bool:
    """True when HOST:PORT names a loopback host (localhost, 127.0.0.0/8, ::1)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return bool(ipaddress.ip_address(host).is_loopback)
    except ValueError:
        return False


def default_data_dir() -> Path:
    """RUNSERVICE_HOME, else ~/.local/share/runservice."""
    home = os.environ.get("RUNSERVICE_HOME")
    return Path(home) if home else Path.home() / ".local" / "share" / "runservice"


@dataclass(frozen=True)
class Settings:
    """What `runservice serve` was asked to do."""

    listen: str = "127.0.0.1:50051"
    data_dir: Path = field(default_factory=default_data_dir)
    db: str = ""
    db_pool_size: int = 10
    db_max_overflow: int = 10
    tokens_file: Path | None = None
    agents: tuple[str, ...] = ()
    dev_token: bool = False
    stop_grace: float = 5.0
    drain_timeout: float = 30.0
    memory_grace: float = 300.0
    retention: float = 7 * 86400.0
    max_retention: float = 90 * 86400.0
    purge_interval: float = 60.0
    max_active: int = 1000
    max_active_per_user: int = 100
    max_queued: int = 10_000
    max_queued_per_user: int = 1000
    default_timeout: float = 0.0
    max_timeout: float = 0.0
    max_receive_message_size: int = 4 * 1024**2
    max_send_message_size: int = 16 * 1024**2
    max_event_size: int = 1024**2
    snapshot_every: int = 1000
    max_resumes: int = 3
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    keepalive_min_ping_interval: float = 10.0
    max_concurrent_streams: int = 1000
    max_connection_age: float = 0.0
    max_connection_age_grace: float = 30.0
    max_metadata_size: int = 16 * 1024
    max_streams_per_user: int = 100
    max_open_streams: int = 100_000
    max_open_streams_per_user: int = 10_000
    stream_stall_timeout: float = 60.0
    lease_ttl: float = 15.0
    workers: int = 1
    worker_index: int | None = None
    """Set by the parent of `--workers N` on each worker (0 to N-1), never by people: a
    worker shares its port with its peers (SO_REUSEPORT)."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    mtls_identity: str = "cn"
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_algorithms: str = "RS256,ES256"
    jwt_secret_file: Path | None = None
    jwt_public_key: Path | None = None
    jwks_file: Path | None = None
    jwt_leeway: float = 30.0
    jwt_user_claim: str = "sub"
    jwt_roles_claim: str = "roles"
    admins: tuple[str, ...] = ()
    insecure_no_auth: bool = False
    log_level: str = "info"
    log_format: str = "text"
    event_loop: str = "uvloop"
    metrics_listen: str = ""
    """HOST:PORT of the Prometheus endpoint; empty: none."""
    http_listen: str = ""
    """HOST:PORT of the HTTP edge (runservice/web); empty: none."""
    http_long_poll_timeout: float = 20.0
    http_sse_heartbeat: float = 15.0
    http_sse_max_duration: float = 60.0
    http_cors_origins: tuple[str, ...] = ()
    """Origins a browser may call the HTTP edge from (`*`: any); empty: no CORS headers."""
    read_token_ttl: float = 900.0
    """The longest (and the default) lifetime of a read token (CreateReadToken)."""
    webhook_url: str = ""
    """Where every run's end is POSTed (runservice/webhooks); empty: nowhere."""
    webhook_allow: tuple[str, ...] = ()
    """URL prefixes a run's own webhook_url must start with; empty: runs may name none."""
    webhook_secret_file: Path | None = None
    webhook_max_age: float = 86400.0

    @property
    def db_url(self) -> str:
        """The database URL: --db, else a SQLite file in the data directory."""
        return self.db or f"sqlite+aiosqlite:///{self.data_dir / 'runservice.db'}"

    @property
    def tokens_path(self) -> Path:
        """The tokens file: --tokens-file, else tokens.toml in the data directory."""
        return self.tokens_file or self.data_dir / "tokens.toml"


@dataclass(frozen=True)
class _Option:
    flag: str
    help: str
    type: Any = str
    default_text: str = ""
    secret: bool = False
    """May hold a password: passed on to another process in its variable, never as a flag
    (any user of the machine can read a command line)."""

    @property
    def attr(self) -> str:
        """The Settings field: --stop-grace → stop_grace."""
        return self.flag.replace("-", "_")

    @property
    def takes_number(self) -> bool:
        """A count, a duration or a size: a configuration file may give it as a number."""
        return self.type not in (str, Path) and not isinstance(self.type, _OneOf)

    def parse(self, text: str) -> Any:
        """`text` as the flag takes it; raises argparse.ArgumentTypeError saying why not."""
        try:
            return self.type(text)
        except ValueError:  # from `int`, in Python's words
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


OPTIONS: tuple[_Option, ...] = (
    _Option("listen", "address to listen on, HOST:PORT", str, "127.0.0.1:50051"),
    _Option(
        "data-dir",
        "directory for the SQLite file, tokens file and secrets",
        Path,
        "$RUNSERVICE_HOME or ~/.local/share/runservice",
    ),
    _Option(
        "db",
        "database URL, sqlite+aiosqlite:///FILE or postgresql+asyncpg://USER[:PASS]@HOST:PORT/DB",
        str,
        "a SQLite file in the data directory",
        secret=True,
    ),
    _Option(
        "db-pool-size",
        "PostgreSQL connections the server keeps open",
        _count(1),
        str(Settings.db_pool_size),
    ),
    _Option(
        "db-max-overflow",
        "PostgreSQL connections opened beyond --db-pool-size for a burst, then closed",
        _count(0),
        str(Settings.db_max_overflow),
    ),
    _Option(
        "lease-ttl",
        "replicas on PostgreSQL: how long a silent replica's runs stay its own before a "
        "peer interrupts them",
        _at_least(1.0),
        "15s",
    ),
    _Option(
        "workers",
        "replica processes serving the one --listen port, so one machine uses every core; "
        "needs PostgreSQL (--db) and a fixed port. Worker i is a replica with "
        "DATA_DIR/worker-<i> as its data dir; all share the tokens file, the database and "
        "every listener (the gRPC port with its health service: a check reaches any worker, "
        "whose readiness is its own store's health). SIGTERM/SIGINT stop them all; a worker "
        "that dies is restarted (see docs/operations.md)",
        _count(1),
        str(Settings.workers),
    ),
    _Option("tokens-file", "TOML file of hashed bearer tokens", Path, "DATA_DIR/tokens.toml"),
    _Option("stop-grace", "how long a stopped agent may clean up", parse_duration, "5s"),
    _Option(
        "drain-timeout",
        "how long runs may finish at shutdown before interruption",
        parse_duration,
        "30s",
    ),
    _Option(
        "memory-grace",
        "how long finished runs stay in memory after their last reader",
        parse_duration,
        "5m",
    ),
    _Option(
        "retention",
        "how long finished runs and their logs are kept, for runs that set no retention "
        "of their own (StartRunRequest.retention); at most --max-retention",
        parse_duration,
        "7d",
    ),
    _Option(
        "max-retention",
        "the longest retention a run may ask for (StartRunRequest.retention); at least 1s, "
        "at most 36600d",
        _duration_between(1.0, MAX_RETENTION_CEILING),
        "90d",
    ),
    _Option("purge-interval", "how often expired runs are purged", parse_duration, "1m"),
    _Option("max-active", "active runs on the server; 0 = no cap", int, "1000"),
    _Option("max-active-per-user", "active runs per user; 0 = no cap", int, "100"),
    _Option(
        "max-queued",
        "runs waiting for their turn on a thread, server-wide; 0 = no cap",
        int,
        "10000",
    ),
    _Option(
        "max-queued-per-user",
        "runs waiting for their turn on a thread, per user; 0 = no cap",
        int,
        "1000",
    ),
    _Option("default-timeout", "time limit of runs that set none; 0 = none", parse_duration, "0"),
    _Option(
        "max-timeout", "the largest time limit a run may ask for; 0 = none", parse_duration, "0"
    ),
    _Option("max-receive-message-size", "largest request message accepted", parse_size, "4MiB"),
    _Option("max-send-message-size", "largest response message sent", parse_size, "16MiB"),
    _Option(
        "max-event-size",
        "largest event an agent may emit (encoded) and largest result it may return",
        parse_size,
        "1MiB",
    ),
    _Option(
        "snapshot-every",
        "store a snapshot of a run's output every this many events (or 256 KiB of them, "
        "whichever first) and at its end, for Subscribe with snapshot",
        _count(1),
        str(Settings.snapshot_every),
    ),
    _Option(
        "max-resumes",
        "times a resumable agent's run is resumed from its checkpoint after the server "
        "executing it stopped, at most (then it ends INTERRUPTED); 0 never resumes",
        _count(0),
        str(Settings.max_resumes),
    ),
    _Option("keepalive-time", "interval of server keepalive pings", parse_duration, "60s"),
    _Option("keepalive-timeout", "how long to wait for a keepalive ack", parse_duration, "20s"),
    _Option(
        "keepalive-min-ping-interval",
        "the most frequent client pings tolerated",
        parse_duration,
        "10s",
    ),
    _Option("max-concurrent-streams", "HTTP/2 streams per connection", int, "1000"),
    _Option(
        "max-connection-age", "close connections after this long; 0 = never", parse_duration, "0"
    ),
    _Option(
        "max-connection-age-grace",
        "time for calls to finish when a connection is aged out",
        parse_duration,
        "30s",
    ),
    _Option(
        "max-metadata-size", "largest request metadata (headers) accepted", parse_size, "16KiB"
    ),
    _Option(
        "max-streams-per-user", "open Subscribe/WatchRuns streams per user; 0 = no cap", int, "100"
    ),
    _Option(
        "max-open-streams",
        "open external runs (agent external, /v1/streams) on the database; 0 = no cap",
        int,
        "100000",
    ),
    _Option(
        "max-open-streams-per-user",
        "open external runs per user; 0 = no cap",
        int,
        "10000",
    ),
    _Option(
        "stream-stall-timeout",
        "end a Subscribe/WatchRuns stream whose client takes nothing for this long "
        "(UNAVAILABLE, STREAM_STALLED; clients resume)",
        parse_duration,
        "60s",
    ),
    _Option("tls-cert", "PEM certificate chain: serve TLS", Path, "none (plaintext)"),
    _Option("tls-key", "PEM private key of --tls-cert", Path, "none"),
    _Option(
        "tls-client-ca", "PEM CA bundle: require client certificates it signed (mTLS)", Path, "none"
    ),
    _Option(
        "mtls-identity",
        "the client certificate field naming the user: cn or san",
        _OneOf(("cn", "san")),
        "cn",
    ),
    _Option("jwt-issuer", "accept JWTs from this issuer (iss); enables JWT auth", str, "none"),
    _Option("jwt-audience", "the audience (aud) JWTs must name", str, "none"),
    _Option("jwt-algorithms", "allowed JWT algorithms, comma-separated", str, "RS256,ES256"),
    _Option("jwt-secret-file", "file holding the HS256 secret", Path, "none"),
    _Option("jwt-public-key", "PEM public key for RS256/ES256 JWTs", Path, "none"),
    _Option("jwks-file", "JWKS file of public keys by kid, re-read when it changes", Path, "none"),
    _Option("jwt-leeway", "clock skew tolerated on exp and nbf", parse_duration, "30s"),
    _Option("jwt-user-claim", "the JWT claim naming the user", str, "sub"),
    _Option("jwt-roles-claim", "the JWT claim listing roles", str, "roles"),
    _Option("log-level", "debug, info, warning or error", _OneOf(LOG_LEVELS), "info"),
    _Option(
        "log-format",
        "stderr log lines: text (for people) or json (one object a line: time, level, "
        "logger, message and fields such as run_id; see docs/operations.md)",
        _OneOf(LOG_FORMATS),
        Settings.log_format,
    ),
    _Option(
        "event-loop",
        "the asyncio event loop: uvloop (faster) or asyncio (the standard library's)",
        _OneOf(EVENT_LOOPS),
        "uvloop",
    ),
    _Option(
        "http-listen",
        "also serve the API over HTTP/JSON on HOST:PORT, and every run's events as a durable "
        "stream (SSE, long-poll; see docs/http.md); same TLS and authentication as --listen",
        str,
        "none (off)",
    ),
    _Option(
        "http-long-poll-timeout",
        "the longest an HTTP long-poll waits for new events before it answers 204 (a "
        "request's `timeout` may ask for less)",
        _at_least(0.1),
        f"{Settings.http_long_poll_timeout:g}s",
    ),
    _Option(
        "http-sse-heartbeat",
        "how often an idle SSE stream sends a comment line, so proxies keep it open",
        _at_least(0.01),
        f"{Settings.http_sse_heartbeat:g}s",
    ),
    _Option(
        "http-sse-max-duration",
        "end a run's SSE event stream after this long; the client resumes from its last "
        "offset (EventSource does it by itself, with Last-Event-ID)",
        _at_least(0.1),
        f"{Settings.http_sse_max_duration:g}s",
    ),
    _Option(
        "read-token-ttl",
        "the lifetime of a read token (CreateReadToken, POST /v1/runs/ID:readToken), and "
        "the longest one a caller may ask for; keep it short: read tokens travel in URLs",
        _at_least(1.0),
        "15m",
    ),
    _Option(
        "metrics-listen",
        "serve Prometheus metrics over HTTP on HOST:PORT (e.g. 0.0.0.0:9090, path /metrics); "
        "with --workers the parent serves every worker's figures on it (see "
        "docs/operations.md)",
        str,
        "none (off)",
    ),
    _Option(
        "webhook-url",
        "POST every run's end to this http(s) URL, signed per Standard Webhooks with "
        "--webhook-secret-file, retried until answered 2xx or --webhook-max-age passes "
        "(see docs/operations.md, Webhooks)",
        http_url,
        "none (off)",
        secret=True,  # a receiver's URL may carry a token
    ),
    _Option(
        "webhook-secret-file",
        "file of the webhook signing secret, `whsec_` and base64 (one a line: several while "
        "rotating); required with --webhook-url or --webhook-allow",
        Path,
        "none",
    ),
    _Option(
        "webhook-max-age",
        "how long after a run's end its webhooks are retried before they are given up",
        _at_least(0.1),
        "24h",
    ),
)


def _list(text: str) -> list[str]:
    """A comma-separated list, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def env_name(flag: str) -> str:
    """The environment variable of a flag: --stop-grace → RUNSERVICE_STOP_GRACE."""
    return "RUNSERVICE_" + flag.upper().replace("-", "_")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds every server option to `parser`, defaulting from the environment."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help='TOML file of server options, keys named as the flags (listen = "HOST:PORT", '
        'drain-timeout = "30s", agent = [...]); flags and variables win over it; '
        "`runservice config check FILE` checks it (env RUNSERVICE_CONFIG; default none)",
    )
    for opt in OPTIONS:
        env = env_name(opt.flag)
        parser.add_argument(
            f"--{opt.flag}",
            type=opt.type,
            default=None,
            help=f"{opt.help} (env {env}; default {opt.default_text})",
        )
    parser.add_argument(
        "--agent",
        action="append",
        default=None,
        metavar="NAME=module:attr",
        help="register an extra agent; repeatable (env RUNSERVICE_AGENT, comma-separated)",
    )
    parser.add_argument(
        "--http-cors-origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="let browser pages of ORIGIN (https://app.example.com) call the HTTP edge "
        "(CORS); repeatable; `*` allows any origin (env RUNSERVICE_HTTP_CORS_ORIGIN, "
        "comma-separated; default none: no CORS headers)",
    )
    parser.add_argument(
        "--webhook-allow",
        action="append",
        default=None,
        metavar="PREFIX",
        help="let runs name their own webhook_url under PREFIX (https://hooks.example.com/; "
        "same scheme, host and port, path under PREFIX's); repeatable (env "
        "RUNSERVICE_WEBHOOK_ALLOW, comma-separated; default none: runs may name none)",
    )
    parser.add_argument(
        "--admin",
        action="append",
        default=None,
        metavar="USER",
        help="give USER the admin role whatever authenticated them; repeatable "
        "(env RUNSERVICE_ADMIN, comma-separated)",
    )
    # --no-*: a flag can also turn off what the environment or a configuration file turned on.
    parser.add_argument(
        "--insecure-no-auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="accept calls without credentials as user 'anonymous'; only on a loopback "
        "address (env RUNSERVICE_INSECURE_NO_AUTH=1)",
    )
    parser.add_argument(
        "--dev-token",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="create a development token (admin) in DATA_DIR/dev-token, mode 600, if absent "
        "(env RUNSERVICE_DEV_TOKEN=1)",
    )
    # Set by the parent of --workers on the workers it starts (runservice/workers.py).
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-ready-fd", type=int, default=None, help=argparse.SUPPRESS)


_TRUTHY = ("1", "true", "yes")


def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Settings from parsed flags, then the environment, then the configuration file
    (--config, else RUNSERVICE_CONFIG), then the defaults.

    Raises ConfigFileError listing every problem of the file, and SystemExit naming a
    variable that does not parse.
    """
    env = os.environ if environ is None else environ
    config_file = getattr(args, "config", None) or env.get("RUNSERVICE_CONFIG")
    values = read_config_file(Path(config_file)) if config_file else {}
    for opt in OPTIONS:
        value = getattr(args, opt.attr, None)
        if value is None and env_name(opt.flag) in env:
            try:
                value = opt.parse(env[env_name(opt.flag)])
            except argparse.ArgumentTypeError as exc:
                raise SystemExit(f"{env_name(opt.flag)}: {exc}") from None
        if value is not None:
            values[opt.attr] = value
    for flag, attr in _LIST_KEYS.items():
        given = getattr(args, flag.replace("-", "_"), None) or _list(env.get(env_name(flag), ""))
        if given:
            values[attr] = tuple(given)
    for flag, attr in _BOOLEAN_KEYS.items():
        switch = getattr(args, attr, None)
        variable = env.get(env_name(flag), "")
        if switch is not None:
            values[attr] = switch
        elif variable:
            values[attr] = variable.lower() in _TRUTHY
    values["worker_index"] = getattr(args, "worker_index", None)
    return Settings(**values)


# -- the configuration file -----------------------------------------------------------------

# Keys of the configuration file beyond OPTIONS' flags, with their Settings fields.
_LIST_KEYS = {
    "agent": "agents",
    "admin": "admins",
    "http-cors-origin": "http_cors_origins",
    "webhook-allow": "webhook_allow",
}
_BOOLEAN_KEYS = {"insecure-no-auth": "insecure_no_auth", "dev-token": "dev_token"}
_OPTIONS_BY_FLAG = {opt.flag: opt for opt in OPTIONS}
FILE_KEYS = (*_OPTIONS_BY_FLAG, *_LIST_KEYS, *_BOOLEAN_KEYS)
"""Every key a configuration file may hold: the flags of `runservice serve`, without --."""


class ConfigFileError(Exception):
    """A configuration file that cannot be used. `problems` has one line per problem, each
    naming the file and the key (or the line and column of a TOML syntax error)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _ValueProblemError(Exception):
    """What is wrong with one key of a configuration file."""


def read_config_file(path: Path) -> dict[str, Any]:
    """The Settings fields a configuration file sets, parsed as their flags are (a TOML
    number is taken where a count, duration or size is meant, as seconds or bytes).

    Raises ConfigFileError listing every problem, not only the first.
    """
    try:
        document = tomllib.loads(path.read_bytes().decode())
    except OSError as exc:
        raise ConfigFileError([f"{path}: cannot read it: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigFileError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError([f"{path}: not valid TOML: {exc}"]) from None
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, raw in document.items():
        try:
            attr, value = _file_value(key, raw)
        except _ValueProblemError as exc:
            problems.append(f"{path}: {key}: {exc}")
        else:
            values[attr] = value
    if problems:
        raise ConfigFileError(problems)
    return values


def _file_value(key: str, raw: object) -> tuple[str, Any]:
    """The Settings field `key` sets and its value; raises _ValueProblemError."""
    if key in _LIST_KEYS:
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise _ValueProblemError(f"expected an array of strings, got {_toml_type(raw)}")
        return _LIST_KEYS[key], tuple(raw)
    if key in _BOOLEAN_KEYS:
        if not isinstance(raw, bool):
            raise _ValueProblemError(f"expected true or false, got {_toml_type(raw)}")
        return _BOOLEAN_KEYS[key], raw
    opt = _OPTIONS_BY_FLAG.get(key)
    if opt is None:
        raise _ValueProblemError(_unknown_key(key))
    number = isinstance(raw, int | float) and not isinstance(raw, bool)
    if not isinstance(raw, str) and not (number and opt.takes_number):
        expected = "a number or a string" if opt.takes_number else "a string"
        raise _ValueProblemError(f"expected {expected}, got {_toml_type(raw)}")
    try:
        return opt.attr, opt.parse(raw if isinstance(raw, str) else _flag_text(raw))
    except argparse.ArgumentTypeError as exc:
        raise _ValueProblemError(str(exc)) from None


def _unknown_key(key: str) -> str:
    """Says `key` is unknown, and which key was meant when one is close."""
    close = difflib.get_close_matches(key.replace("_", "-").lower(), FILE_KEYS, n=1)
    hint = f"; did you mean {close[0]}?" if close else "; see `runservice serve --help`"
    return "unknown key" + hint


def _toml_type(value: object) -> str:
    """What TOML calls the type of `value`, with its article."""
    if isinstance(value, list):
        kinds = sorted({_toml_type(item) for item in value if not isinstance(item, str)})
        return f"an array holding {kinds[0]}" if kinds else "an array"
    names = [(bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string")]
    names += [(dict, "a table")]
    return next((name for kind, name in names if isinstance(value, kind)), "a date or time")


def file_document(settings: Settings) -> dict[str, Any]:
    """`settings` by configuration file key, as JSON: durations in seconds, sizes in bytes,
    paths as strings, unset paths as null."""
    document: dict[str, Any] = {}
    for opt in OPTIONS:
        value = getattr(settings, opt.attr)
        document[opt.flag] = str(value) if isinstance(value, Path) else value
    for flag, attr in (*_LIST_KEYS.items(), *_BOOLEAN_KEYS.items()):
        value = getattr(settings, attr)
        document[flag] = list(value) if isinstance(value, tuple) else value
    return document


_OTHER_FLAGS = (
    "config",
    "agent",
    "admin",
    "http-cors-origin",
    "webhook-allow",
    "insecure-no-auth",
    "dev-token",
)


def server_variables() -> frozenset[str]:
    """The environment variables `runservice serve` takes its options from."""
    return frozenset(env_name(flag) for flag in (*(opt.flag for opt in OPTIONS), *_OTHER_FLAGS))


def serve_invocation(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """Flags and variables of `runservice serve` that give back `settings` where none of
    server_variables() is otherwise set: --data-dir and every option not at its default,
    as a flag or, if it may hold a password, as its variable.

    Never --config: `settings` already hold what a configuration file gave, and a file read
    again would bring back values that flags or variables had overridden with the default.
    """
    defaults = Settings(data_dir=settings.data_dir)
    argv = [f"--data-dir={settings.data_dir}"]
    env: dict[str, str] = {}
    for opt in OPTIONS:
        value = getattr(settings, opt.attr)
        if value == getattr(defaults, opt.attr):
            continue
        if opt.secret:
            env[env_name(opt.flag)] = _flag_text(value)
        else:
            argv.append(f"--{opt.flag}={_flag_text(value)}")
    argv += [f"--agent={spec}" for spec in settings.agents]
    argv += [f"--admin={user}" for user in settings.admins]
    argv += [f"--http-cors-origin={origin}" for origin in settings.http_cors_origins]
    argv += [f"--webhook-allow={prefix}" for prefix in settings.webhook_allow]
    if settings.insecure_no_auth:
        argv.append("--insecure-no-auth")
    if settings.dev_token:
        argv.append("--dev-token")
    if settings.worker_index is not None:
        argv.append(f"--worker-index={settings.worker_index}")
    return argv, env


def _flag_text(value: object) -> str:
    """`value` as its flag takes it: durations in seconds, to the nanosecond."""
    if isinstance(value, float):
        text = repr(value)
        return text if "e" not in text else f"{value:.9f}"
    return str(value)
