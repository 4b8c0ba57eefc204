"""The configuration file of `runservice serve` (--config, RUNSERVICE_CONFIG) and
`runservice config check`: precedence, every problem reported, workers, the README example."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runservice import config, workers
from runservice.cli import _parser, main
from tests.serverproc import (
    STARTUP_TIMEOUT_S,
    ServerProcess,
    free_port,
    serve_until_exit,
    server_env,
    wait_healthy,
)

ROOT = Path(__file__).resolve().parent.parent


def _settings(argv: list[str], env: dict[str, str]) -> config.Settings:
    """The settings `runservice serve ARGV` runs with in environment `env`."""
    return config.settings_from_args(_parser().parse_args(["serve", *argv]), env)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# Each option: its line in a file, its variable's value, its flag, and the value each layer
# gives (default, file, environment, flag).
PRECEDENCE = [
    pytest.param(
        'drain-timeout = "2m"',
        ("RUNSERVICE_DRAIN_TIMEOUT", "45s"),
        ["--drain-timeout", "1.5"],
        "drain_timeout",
        (30.0, 120.0, 45.0, 1.5),
        id="duration",
    ),
    pytest.param(
        "db-pool-size = 3",
        ("RUNSERVICE_DB_POOL_SIZE", "4"),
        ["--db-pool-size", "5"],
        "db_pool_size",
        (10, 3, 4, 5),
        id="count",
    ),
    pytest.param(
        'agent = ["a=mod:a"]',
        ("RUNSERVICE_AGENT", "b=mod:b,c=mod:c"),
        ["--agent", "d=mod:d"],
        "agents",
        ((), ("a=mod:a",), ("b=mod:b", "c=mod:c"), ("d=mod:d",)),
        id="list",
    ),
    pytest.param(
        "dev-token = true",
        ("RUNSERVICE_DEV_TOKEN", "0"),
        ["--dev-token"],
        "dev_token",
        (False, True, False, True),
        id="boolean",
    ),
]


@pytest.mark.parametrize(("line", "variable", "flag", "attr", "expected"), PRECEDENCE)
def test_a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default(
    tmp_path: Path,
    *,
    line: str,
    variable: tuple[str, str],
    flag: list[str],
    attr: str,
    expected: tuple[object, object, object, object],
) -> None:
    """Each layer overrides the ones below it, for a duration, a count, a list and a boolean."""
    path = _write(tmp_path / "runservice.toml", line + "\n")
    with_file = ["--config", str(path)]
    env = dict([variable])

    assert getattr(_settings([], {}), attr) == expected[0]
    assert getattr(_settings(with_file, {}), attr) == expected[1]
    assert getattr(_settings(with_file, env), attr) == expected[2]
    assert getattr(_settings([*with_file, *flag], env), attr) == expected[3]


def test_runservice_config_names_the_file_and_a_no_flag_turns_off_what_it_turned_on(
    tmp_path: Path,
) -> None:
    """RUNSERVICE_CONFIG is read like --config, and --no-dev-token beats `dev-token = true`."""
    path = _write(tmp_path / "runservice.toml", 'dev-token = true\nlisten = "0.0.0.0:7000"\n')
    env = {"RUNSERVICE_CONFIG": str(path)}

    assert _settings([], env).listen == "0.0.0.0:7000"
    assert _settings([], env).dev_token is True
    assert _settings(["--no-dev-token"], env).dev_token is False


def test_a_file_value_means_what_the_same_flag_value_means(tmp_path: Path) -> None:
    """Strings go through the flags' parsers; TOML numbers are seconds and bytes."""
    path = _write(
        tmp_path / "runservice.toml",
        'stop-grace = "1.5m"\nretention = 86400\nmemory-grace = 0.25\n'
        'max-event-size = "2MiB"\nmax-metadata-size = 2048\nlog-level = "DEBUG"\n',
    )
    flags = [
        *("--stop-grace", "1.5m", "--retention", "86400", "--memory-grace", "0.25"),
        *("--max-event-size", "2MiB", "--max-metadata-size", "2048", "--log-level", "DEBUG"),
    ]

    assert _settings(["--config", str(path)], {}) == _settings(flags, {})


def test_config_check_of_a_good_file_prints_ok_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file without problems is `FILE: ok`; with --json, the settings it gives by key."""
    path = _write(tmp_path / "good.toml", 'drain-timeout = "1m"\nadmin = ["root"]\n')

    assert main(["config", "check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok\n"
    assert main(["config", "check", "--json", str(path)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["drain-timeout"] == 60.0
    assert document["admin"] == ["root"]
    assert set(document) == set(config.FILE_KEYS)


def test_config_check_reports_every_problem_naming_its_key_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three bad values are three lines, each naming the file, the key and what is wrong."""
    path = _write(
        tmp_path / "bad.toml",
        'listen = "127.0.0.1:50051"\ndrain-timeout = "soon"\ndb-pool-size = 0\nagent = "x=m:a"\n',
    )

    assert main(["config", "check", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"{path}: drain-timeout: 'soon' is not a duration like 30s, 5m or 7d",
        f"{path}: db-pool-size: 0 is below the least allowed, 1",
        f"{path}: agent: expected an array of strings, got a string",
    ]


@pytest.mark.parametrize(
    ("key", "meant"), [("lisen", "listen"), ("drain_timeout", "drain-timeout"), ("agents", "agent")]
)
def test_an_unknown_key_is_reported_with_the_key_it_resembles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, meant: str
) -> None:
    """A misspelt key is refused with the key it resembles."""
    path = _write(tmp_path / "typo.toml", f'{key} = "1"\n')

    assert main(["config", "check", str(path)]) == 1
    assert capsys.readouterr().err == f"{path}: {key}: unknown key; did you mean {meant}?\n"


def test_invalid_toml_is_reported_with_its_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A syntax error names where it is."""
    path = _write(tmp_path / "broken.toml", 'listen = "127.0.0.1:1"\nretention = \n')

    assert main(["config", "check", str(path)]) == 1
    assert re.fullmatch(
        rf"{re.escape(str(path))}: not valid TOML: .*\(at line 2, column 13\)\n",
        capsys.readouterr().err,
    )


async def test_serve_refuses_a_bad_file_with_one_line_per_problem(tmp_path: Path) -> None:
    """`serve --config BAD` exits 1 with the problems `config check` reports, no traceback."""
    path = _write(tmp_path / "bad.toml", 'stop-grace = "x"\nmax-active = "many"\ndevtoken = true\n')

    result = await serve_until_exit(tmp_path / "data", ["--config", str(path)])

    assert result.code == 1, result.text
    assert result.lines == [
        f"{path}: stop-grace: 'x' is not a duration like 30s, 5m or 7d",
        f"{path}: max-active: 'many' is not a whole number",
        f"{path}: devtoken: unknown key; did you mean dev-token?",
    ]


async def test_serve_listens_where_its_configuration_file_says(tmp_path: Path) -> None:
    """With no --listen or --data-dir, the file's `listen` and `data-dir` are used."""
    addr = f"127.0.0.1:{free_port()}"
    data_dir = tmp_path / "data"
    path = _write(
        tmp_path / "good.toml",
        f'listen = "{addr}"\ndata-dir = "{data_dir}"\ndrain-timeout = "1s"\n',
    )
    log_path = tmp_path / "server.log"
    log_file = log_path.open("ab")
    command = [sys.executable, "-m", "runservice", "serve", "--config", str(path)]
    proc = subprocess.Popen(  # noqa: ASYNC220 - polled without blocking by wait_healthy
        command,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=server_env(),
    )
    server = ServerProcess(int(addr.rsplit(":", 1)[1]), data_dir, log_path, proc, log_file)
    try:
        await wait_healthy(addr, limit=STARTUP_TIMEOUT_S, proc=proc)
        assert (data_dir / "runservice.db").exists()
        assert await server.terminate() == 0, server.log_tail()
    finally:
        await server.kill()


def test_workers_get_the_file_s_values_as_flags_and_never_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's command line gives back the parent's settings without --config or
    RUNSERVICE_CONFIG, so a variable the parent let win over the file still wins."""
    path = _write(
        tmp_path / "runservice.toml",
        'listen = "0.0.0.0:7000"\nretention = "3d"\nagent = ["x=mod:a"]\n'
        'db = "postgresql+asyncpg://u:secret@db/runs"\nlog-level = "debug"\n',
    )
    monkeypatch.setenv("RUNSERVICE_CONFIG", str(path))
    monkeypatch.setenv("RUNSERVICE_LOG_LEVEL", "info")  # the default, over the file's debug
    settings = _settings(["--data-dir", str(tmp_path)], dict(os.environ))
    assert settings.log_level == "info"

    command, env = workers.worker_invocation(settings, 0, 9)

    assert "RUNSERVICE_CONFIG" not in env
    assert not any(arg.startswith("--config") for arg in command)
    assert "secret" not in " ".join(command)
    args = _parser().parse_args(command[command.index("serve") :])
    assert config.settings_from_args(args, env) == workers.worker_settings(settings, 0)


def test_the_readme_example_file_passes_config_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every key of the README's example configuration file is valid."""
    section = (ROOT / "README.md").read_text().split("## Configuration", 1)[1]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)
    example = next(block for block in blocks if "listen = " in block)
    path = _write(tmp_path / "runservice.toml", example)

    assert main(["config", "check", str(path)]) == 0, capsys.readouterr().err
    assert len(config.read_config_file(path)) >= 10
