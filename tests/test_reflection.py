"""Reflection that every gRPC tool understands: both protocol versions, every kind of symbol,
and grpcurl, ghz and `buf curl` working against a live server with no `.proto` files.

The tools are installed by `make test` (grpcurl and ghz into .tools/bin, buf into
protos/node_modules); without CI a missing tool skips its test, with CI it fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as rpb
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from runservice.api.reflection import V1_SERVICE, V1ALPHA_SERVICE
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Harness
from tests.helpers import start

ROOT = Path(__file__).parent.parent
TOOLS = {
    "grpcurl": (ROOT / ".tools" / "bin" / "grpcurl", "make grpcurl"),
    "ghz": (ROOT / ".tools" / "bin" / "ghz", "make ghz"),
    "buf": (ROOT / "protos" / "node_modules" / ".bin" / "buf", "make buf"),
}
SERVICES = {"grpc.health.v1.Health", V1_SERVICE, V1ALPHA_SERVICE, "runservice.v1.RunService"}
SYMBOLS = {
    "runservice.v1.RunService": "runservice/v1/run_service.proto",
    "runservice.v1.RunService.StartRun": "runservice/v1/run_service.proto",
    "runservice.v1.StartRunRequest": "runservice/v1/run_service.proto",
    "runservice.v1.RunState": "runservice/v1/run.proto",
    "runservice.v1.RUN_STATE_RUNNING": "runservice/v1/run.proto",
    "runservice.v1.Run.state": "runservice/v1/run.proto",
    "grpc.health.v1.Health.Check": "grpc_health/v1/health.proto",
    "grpc.reflection.v1.ServerReflection.ServerReflectionInfo": (
        "grpc/reflection/v1/reflection.proto"
    ),
}


def _tool(name: str) -> str:
    path, target = TOOLS[name]
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: `make test` installs it ({target})")
        pytest.skip(f"{name} is not installed ({target})")
    return found


async def _run(*command: str, env: dict[str, str] | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, f"{command[0]} {command[1:4]}...: {err.decode()}{out.decode()}"
    return out.decode()


async def _grpcurl(server: Harness, *args: str) -> str:
    return await _run(_tool("grpcurl"), "-plaintext", server.address, *args)


async def _ask(
    server: Harness, service: str, requests: Sequence[rpb.ServerReflectionRequest]
) -> Any:
    """The responses of one reflection stream under `service`, sent with no credentials."""
    call = server.channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=rpb.ServerReflectionRequest.SerializeToString,
        response_deserializer=rpb.ServerReflectionResponse.FromString,
    )
    return [response async for response in call(iter(requests))]


@pytest.mark.parametrize("service", [V1_SERVICE, V1ALPHA_SERVICE])
async def test_each_version_resolves_every_kind_of_symbol_to_its_file(
    server: Harness, service: str
) -> None:
    """Under v1 and v1alpha, services, methods, messages, enums, enum values and fields
    resolve to the file that defines them, and every service is listed."""
    requests = [rpb.ServerReflectionRequest(file_containing_symbol=s) for s in SYMBOLS]
    requests.append(rpb.ServerReflectionRequest(list_services="*"))
    *files, listed = await _ask(server, service, requests)
    for symbol, response in zip(SYMBOLS, files, strict=True):
        first = descriptor_pb2.FileDescriptorProto.FromString(
            response.file_descriptor_response.file_descriptor_proto[0]
        )
        assert first.name == SYMBOLS[symbol], response
        assert response.original_request.file_containing_symbol == symbol
    assert {s.name for s in listed.list_services_response.service} == SERVICES


async def test_an_unknown_symbol_is_answered_not_found_and_the_stream_goes_on(
    server: Harness,
) -> None:
    """A method that does not exist gets a NOT_FOUND answer; the next request is answered."""
    missing, found = await _ask(
        server,
        V1_SERVICE,
        [
            rpb.ServerReflectionRequest(file_containing_symbol="runservice.v1.RunService.Nope"),
            rpb.ServerReflectionRequest(file_by_filename="runservice/v1/run.proto"),
        ],
    )
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "runservice.v1.RunService.Nope" in missing.error_response.error_message
    assert found.file_descriptor_response.file_descriptor_proto


async def test_the_python_v1alpha_client_finds_a_method_and_its_dependencies(
    server: Harness,
) -> None:
    """grpcio-reflection's own (v1alpha) client lists the services and fetches the file of
    StartRun, with the files it imports."""

    def look_up() -> tuple[set[str], str, str]:
        with grpc.insecure_channel(server.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            method_file = database.FindFileContainingSymbol("runservice.v1.RunService.StartRun")
            status_file = database.FindFileContainingSymbol("google.rpc.Status")
            return services, method_file.name, status_file.name

    # The sync client would block the loop that serves it: it runs in a thread.
    services, method_file, status_file = await asyncio.to_thread(look_up)
    assert services == SERVICES
    assert method_file == "runservice/v1/run_service.proto"
    assert status_file == "google/rpc/status.proto"


async def test_grpcurl_lists_and_describes_without_proto_files_or_credentials(
    server: Harness,
) -> None:
    """grpcurl (which speaks v1) lists the services and describes a method, a message, an
    enum and the v1 reflection service itself."""
    assert set((await _grpcurl(server, "list")).split()) == SERVICES
    method = await _grpcurl(server, "describe", "runservice.v1.RunService.StartRun")
    assert "rpc StartRun ( .runservice.v1.StartRunRequest )" in method
    message = await _grpcurl(server, "describe", "runservice.v1.StartRunRequest")
    assert "message StartRunRequest {" in message and "string agent = 1;" in message
    enum = await _grpcurl(server, "describe", "runservice.v1.RunState")
    assert "enum RunState {" in enum and "RUN_STATE_SUCCEEDED = 3;" in enum
    v1 = await _grpcurl(server, "describe", V1_SERVICE)
    assert "stream .grpc.reflection.v1.ServerReflectionRequest" in v1


async def test_grpcurl_prints_the_error_info_of_a_refusal(server: Harness) -> None:
    """A refused call's ErrorInfo detail is described by reflection, so grpcurl decodes it
    (reason, domain, metadata) instead of printing "not recognized"."""
    token = server.tokens["alice"]
    missing = "01a243f3-4381-7145-ad58-e965f68c706a"
    command = (
        _tool("grpcurl"),
        "-plaintext",
        "-H",
        f"authorization: Bearer {token}",
        "-d",
        json.dumps({"run_id": missing}),
        server.address,
        "runservice.v1.RunService/GetRun",
    )
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    printed = out.decode() + err.decode()
    assert proc.returncode != 0, printed
    assert "not recognized" not in printed, printed
    assert '"reason": "RUN_NOT_FOUND"' in printed and '"domain": "runservice"' in printed
    assert f'"run_id": "{missing}"' in printed


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_buf_curl_lists_methods_and_calls_through_either_version(
    server: Harness, protocol: str
) -> None:
    """`buf curl` lists every method and calls ListAgents, through v1 and through v1alpha."""
    buf = _tool("buf")
    base = ("curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", protocol)
    url = f"http://{server.address}"
    methods = await _run(buf, *base, "--list-methods", url)
    assert "runservice.v1.RunService/StartRun" in methods.split()
    header = f"authorization: Bearer {server.tokens['alice']}"
    agents = await _run(buf, *base, "-H", header, f"{url}/runservice.v1.RunService/ListAgents")
    assert {a["name"] for a in json.loads(agents)["agents"]} >= {"echo", "ticker"}


async def _ghz(server: Harness, method: str, data: dict[str, Any], *, n: int, c: int) -> Any:
    """ghz's JSON report of `n` calls of `method` (`c` at a time), described by reflection."""
    metadata = {"authorization": f"Bearer {server.tokens['alice']}"}
    report = await _run(
        _tool("ghz"),
        "--insecure",
        "--call",
        f"runservice.v1.RunService/{method}",
        "--data",
        json.dumps(data),
        "--metadata",
        json.dumps(metadata),
        "-n",
        str(n),
        "-c",
        str(c),
        "--format",
        "json",
        server.address,
    )
    return json.loads(report)


async def test_ghz_starts_runs_through_reflection_only(server: Harness) -> None:
    """ghz runs 50 StartRun calls, 5 at a time, all OK, knowing the API only by reflection."""
    report = await _ghz(server, "StartRun", {"agent": "echo", "input": {"text": "a b"}}, n=50, c=5)
    assert report["statusCodeDistribution"] == {"OK": 50}, report.get("errorDistribution")
    assert report["count"] == 50


async def test_ghz_subscribes_to_a_finished_run_through_reflection_only(server: Harness) -> None:
    """ghz replays a finished run's events over the server stream 20 times, all OK."""
    caller = server.caller("alice")
    run = await start(caller, "echo", text="one two three")
    async for _ in caller.Subscribe(pb.SubscribeRequest(run_id=run.run_id)):
        pass  # the stream ends when the run does
    report = await _ghz(server, "Subscribe", {"run_id": run.run_id}, n=20, c=4)
    assert report["statusCodeDistribution"] == {"OK": 20}, report.get("errorDistribution")


def _documented_commands() -> list[str]:
    """The commands of docs/clients.md's grpcurl section, continuation lines joined."""
    section = (ROOT / "docs" / "clients.md").read_text().split("\n## grpcurl", 1)[1]
    blocks = re.findall(r"```sh\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    joined = re.sub(r"\\\n\s*", " ", "\n".join(blocks))
    return [line.strip() for line in joined.splitlines() if line.strip()]


async def test_the_ghz_and_buf_curl_commands_in_the_docs_run(server: Harness) -> None:
    """docs/clients.md's ghz and buf curl commands run as written against a live server."""
    commands = _documented_commands()
    assert [c.split()[0] for c in commands] == ["ghz", "buf"], commands
    tools = {Path(_tool(name)).parent for name in ("ghz", "buf")}
    env = {
        **os.environ,
        "PATH": os.pathsep.join([*map(str, tools), os.environ["PATH"]]),
        "ADDR": server.address,
        "TOKEN": server.tokens["alice"],
    }
    ghz_out, buf_out = [await _run("bash", "-c", command, env=env) for command in commands]
    assert re.search(r"\[OK\]\s+50 responses", ghz_out), ghz_out
    assert '"name": "echo"' in buf_out
