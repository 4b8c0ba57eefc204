"""The committed generated code and the protos stay in sync, and the protos pass buf lint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protos"
GENERATED_DIR = Path("runservice") / "v1"
# Hand-written files that live beside the generated code.
NOT_GENERATED = {"__init__.py"}
BUF = PROTO_DIR / "node_modules" / ".bin" / "buf"


def _files(root: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for path in root.iterdir()
        if path.is_file() and path.name not in NOT_GENERATED
    }


def test_generated_python_code_matches_protos(tmp_path: Path) -> None:
    """Regenerating the Python code with protoc reproduces the committed files byte for byte."""
    # The same invocation as `make proto`, from the repository root.
    protos = sorted(
        str(p.relative_to(REPO_ROOT)) for p in (PROTO_DIR / GENERATED_DIR).glob("*.proto")
    )
    assert protos, "no .proto files found"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "protos",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        cwd=REPO_ROOT,
        check=True,
    )

    fresh = _files(tmp_path / GENERATED_DIR)
    committed = _files(REPO_ROOT / GENERATED_DIR)

    assert sorted(committed) == sorted(fresh), "generated code is stale: run make proto"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"generated code is stale: run make proto ({', '.join(stale)})"


def test_buf_lint_passes() -> None:
    """`buf lint` reports no findings on the protos (required when CI is set)."""
    if not BUF.exists():
        message = "buf is not installed: run make buf"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [str(BUF), "lint"], cwd=PROTO_DIR, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"buf lint failed:\n{result.stdout}{result.stderr}"
