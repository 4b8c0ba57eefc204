"""Authentication: JWT checks one by one, key rotation, mTLS identities, expiry mid-stream."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from runservice.app import ConfigError, build
from runservice.client import AsyncRunClient, RetryPolicy
from runservice.config import Settings
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.conftest import Harness
from tests.helpers import error_info

MakeServer = Callable[..., Awaitable[Harness]]
ISS, AUD = "https://issuer.example", "runservice"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
SECRET = "an HS256 secret long enough to be a real one"


def _pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if alg.startswith("RS") else jwt.algorithms.ECAlgorithm
    jwk = json.loads(algorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": now + 600, "iat": now}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _token(key: Any = RSA_KEY, alg: str = "RS256", kid: str = "k1", **claims: Any) -> str:
    return jwt.encode(_claims(**claims), key, algorithm=alg, headers={"kid": kid})


@pytest.fixture
async def jwt_server(make_server: MakeServer, tmp_path: Path) -> Harness:
    """A server accepting HS256 (secret), RS256 and ES256 (JWKS file), leeway 0."""
    (tmp_path / "secret").write_text(SECRET)
    jwks = {"keys": [_jwk(RSA_KEY, "k1", "RS256"), _jwk(EC_KEY, "e1", "ES256")]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    return await make_server(
        jwt_issuer=ISS,
        jwt_audience=AUD,
        jwt_algorithms="HS256,RS256,ES256",
        jwt_secret_file=tmp_path / "secret",
        jwks_file=tmp_path / "jwks.json",
        jwt_leeway=0.0,
    )


async def _call(server: Harness, token: str) -> Any:
    return await server.raw(token).ListAgents(pb.ListAgentsRequest())


async def test_valid_jwts_of_each_algorithm_are_accepted(jwt_server: Harness) -> None:
    """RS256 and ES256 (JWKS by kid) and HS256 (secret) tokens authenticate their subject."""
    for token in (
        _token(),
        _token(EC_KEY, "ES256", "e1", sub="bob"),
        _token(SECRET, "HS256", "hs", sub="carol", roles=["admin"]),
    ):
        assert (await _call(jwt_server, token)).agents
    carol = jwt_server.raw(_token(SECRET, "HS256", "hs", sub="carol", roles=["admin"]))
    run = (await carol.StartRun(pb.StartRunRequest(agent="echo"))).run
    assert run.owner == "carol"
    everyone = await carol.ListRuns(pb.ListRunsRequest(all_users=True))  # roles claim: admin
    assert [r.run_id for r in everyone.runs] == [run.run_id]


def _none_token() -> str:
    header = jwt.utils.base64url_encode(json.dumps({"alg": "none", "kid": "k1"}).encode())
    body = jwt.utils.base64url_encode(json.dumps(_claims()).encode())
    return f"{header.decode()}.{body.decode()}."


def _confused_token() -> str:
    """HS256 'signed' with the RS256 public key: the classic algorithm confusion attack."""
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    body = jwt.utils.base64url_encode(json.dumps(_claims()).encode())
    signing = header + b"." + body
    sig = hmac.new(_pem_public(RSA_KEY), signing, hashlib.sha256).digest()
    return (signing + b"." + jwt.utils.base64url_encode(sig)).decode()


BAD_TOKENS = [
    ("expired", lambda: _token(exp=int(time.time()) - 5), "expired", "TOKEN_EXPIRED"),
    ("not yet valid", lambda: _token(nbf=int(time.time()) + 600), "not valid yet", None),
    ("wrong issuer", lambda: _token(iss="https://evil.example"), "issuer", None),
    ("wrong audience", lambda: _token(aud="other-service"), "audience", None),
    ("no exp", lambda: _token(exp=None), "'exp'", None),
    ("bad signature", lambda: _token()[:-6] + "AAAAAA", "signature", None),
    ("alg none", _none_token, "algorithm 'none'", None),
    ("HS256 with the RSA public key", _confused_token, "signature", None),
    ("unknown kid", lambda: _token(kid="k9"), "key id", None),
    ("foreign key", lambda: _token(rsa.generate_private_key(65537, 2048)), "signature", None),
    ("garbage", lambda: "not.a.jwt", "well-formed", None),
]


@pytest.mark.parametrize(
    ("case", "make", "says", "reason"), BAD_TOKENS, ids=[c[0] for c in BAD_TOKENS]
)
async def test_each_bad_jwt_is_refused_saying_which_check_failed(
    jwt_server: Harness, case: str, make: Callable[[], str], says: str, reason: str | None
) -> None:
    """Each broken token is UNAUTHENTICATED with a message naming the failed check."""
    token = make()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(jwt_server, token)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, case
    assert says in caught.value.details(), (case, caught.value.details())
    assert token not in caught.value.details()
    assert error_info(caught.value).reason == (reason or "CREDENTIALS_INVALID")


async def test_a_new_key_in_the_jwks_file_is_accepted_without_restart(
    jwt_server: Harness, tmp_path: Path
) -> None:
    """Key rotation: a key added to the JWKS file works at once; a removed one stops."""
    new_key = ec.generate_private_key(ec.SECP256R1())
    token = _token(new_key, "ES256", "e2")
    with pytest.raises(grpc.aio.AioRpcError):
        await _call(jwt_server, token)
    jwks = {"keys": [_jwk(new_key, "e2", "ES256")]}  # rotate: e2 in, k1 and e1 out
    (tmp_path / "jwks.json").write_text(json.dumps(jwks, indent=1))
    assert (await _call(jwt_server, token)).agents
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(jwt_server, _token())
    assert "key id" in caught.value.details()


async def test_a_stream_ends_unauthenticated_when_its_jwt_expires(jwt_server: Harness) -> None:
    """Subscribe with a token expiring in 1 s ends TOKEN_EXPIRED; a refreshing client goes on."""
    owner = jwt_server.raw(_token(exp=int(time.time()) + 600))
    request = pb.StartRunRequest(agent="ticker")
    request.input.update({"count": 40, "interval": 0.1})
    run = (await owner.StartRun(request)).run
    short = jwt_server.raw(_token(exp=int(time.time()) + 1))
    seen = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in short.Subscribe(pb.SubscribeRequest(run_id=run.run_id)):
            seen.extend(e.seq for e in response.events)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "TOKEN_EXPIRED"
    assert seen and seen[-1] < 42

    issued = []

    def provider() -> str:
        issued.append(1)
        return _token(exp=int(time.time()) + 1)

    retry = RetryPolicy(initial_backoff=0.01, max_backoff=0.1)
    async with AsyncRunClient(jwt_server.address, token_provider=provider, retry=retry) as client:
        events = [e.seq async for e in client.subscribe(run.run_id)]
    assert events == list(range(1, 43))
    assert len(issued) >= 3  # the stream outlived several tokens


async def test_insecure_no_auth_is_refused_off_loopback(tmp_path: Path) -> None:
    """--insecure-no-auth only starts on a loopback address."""
    settings = Settings(listen="0.0.0.0:0", data_dir=tmp_path, insecure_no_auth=True)
    with pytest.raises(ConfigError, match="loopback"):
        await build(settings)


async def test_insecure_no_auth_on_loopback_makes_callers_anonymous(
    make_server: MakeServer,
) -> None:
    """Without credentials, calls are the user 'anonymous' (and a token still counts)."""
    server = await make_server(insecure_no_auth=True)
    run = (await server.caller(None).StartRun(pb.StartRunRequest(agent="echo"))).run
    assert run.owner == "anonymous"
    assert (
        await server.caller("bob").StartRun(pb.StartRunRequest(agent="echo"))
    ).run.owner == "bob"


# -- mTLS -----------------------------------------------------------------------------------


def _cert(
    subject: str,
    issuer_key: Any,
    issuer_name: str | None = None,
    *,
    ca: bool = False,
    san: str | None = None,
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class _CA:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = name
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )

    def issue(self, cn: str, san: str | None = None) -> tuple[bytes, bytes]:
        return _cert(cn, self.key, self.name, san=san)


@pytest.fixture
async def mtls_server(make_server: MakeServer, tmp_path: Path) -> tuple[Harness, _CA]:
    """A TLS server (cert for localhost) requiring client certificates from its CA."""
    ca = _CA("runservice test CA")
    cert, key = ca.issue("localhost", san="localhost")
    for name, data in (("server.pem", cert), ("server.key", key), ("ca.pem", ca.cert)):
        (tmp_path / name).write_bytes(data)
    server = await make_server(
        tls_cert=tmp_path / "server.pem",
        tls_key=tmp_path / "server.key",
        tls_client_ca=tmp_path / "ca.pem",
        admins=("ops",),
    )
    return server, ca


def _tls_stub(server: Harness, ca: _CA, client: tuple[bytes, bytes] | None) -> Any:
    creds = grpc.ssl_channel_credentials(
        ca.cert, client[1] if client else None, client[0] if client else None
    )
    channel = grpc.aio.secure_channel(f"localhost:{server.app.port}", creds)
    return channel, pb_grpc.RunServiceStub(channel)


async def test_a_client_certificate_from_the_trusted_ca_is_its_user(
    mtls_server: tuple[Harness, _CA],
) -> None:
    """mTLS: the certificate's CN is the user; --admin grants that user the admin role."""
    server, ca = mtls_server
    for cn in ("dora", "ops"):
        channel, stub = _tls_stub(server, ca, ca.issue(cn))
        run = (await stub.StartRun(pb.StartRunRequest(agent="echo"))).run
        assert run.owner == cn
        listing = stub.ListRuns(pb.ListRunsRequest(all_users=True))
        if cn == "ops":
            assert (await listing).runs
        else:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await listing
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await channel.close()


async def test_no_certificate_or_one_from_another_ca_is_refused(
    mtls_server: tuple[Harness, _CA],
) -> None:
    """Without a client certificate, or with one from a foreign CA, nothing gets through."""
    server, ca = mtls_server
    stranger = _CA("some other CA")
    for client in (None, stranger.issue("mallory")):
        channel, stub = _tls_stub(server, ca, client)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListAgents(pb.ListAgentsRequest(), timeout=5)
        assert caught.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.UNAUTHENTICATED,
        )
        await channel.close()


async def test_an_opaque_token_on_a_jwt_server_is_judged_by_the_tokens_file(
    jwt_server: Harness,
) -> None:
    """With JWT and a tokens file, a non-JWT token gets the tokens file's answer."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(jwt_server, "rs_not-a-real-token")
    assert "not valid for this server" in caught.value.details()
    assert (await _call(jwt_server, jwt_server.tokens["alice"])).agents  # tokens still work
