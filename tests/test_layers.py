"""The dependency rule: layers import only inward."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parent.parent / "runservice"
FORBIDDEN = {
    "domain": (
        "grpc",
        "prometheus_client",
        "opentelemetry",
        "sqlalchemy",
        "google",
        "runservice.api",
        "runservice.store",
        "runservice.runtime",
        "runservice.v1",
    ),
    "runtime": (
        "grpc",
        "sqlalchemy",
        "google",
        "prometheus_client",  # it counts through domain.ports.RunMetrics
        "runservice.api",
        "runservice.metrics",
        "runservice.store",
        "runservice.tracing",  # the SDK's setup; runtime/tracing.py uses the API alone
        "runservice.v1",
    ),
    "store": ("grpc", "google", "runservice.api", "runservice.runtime", "runservice.v1"),
    "agents": ("grpc", "sqlalchemy", "runservice.api", "runservice.store", "runservice.v1"),
    # The HTTP edge: a layer beside api, calling the same servicer, runtime and auth.
    "web": ("sqlalchemy", "runservice.store", "runservice.app"),
    # The webhook sender: deliveries reach it through a port (store/webhooks.py is wired in
    # by app), and it speaks HTTP only.
    "webhooks": ("grpc", "sqlalchemy", "runservice.store", "runservice.app", "runservice.runtime"),
}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_does_not_import_outward(layer: str) -> None:
    """Each layer imports only inward (domain ← runtime ← api; store → domain)."""
    for path in (ROOT / layer).rglob("*.py"):
        bad = {n for n in _imports(path) if n.startswith(FORBIDDEN[layer])}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
