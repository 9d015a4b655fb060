"""The committed stubs match the .proto files, and every contract element is documented."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.helpers import REPO

PROTO = REPO / "proto"
PROTOS = sorted(p.relative_to(PROTO).as_posix() for p in PROTO.glob("deepgen/**/*.proto"))


def pinned_grpc_tools() -> str:
    """The grpcio-tools version requirements-dev.txt pins (the one `make proto` generates with)."""
    match = re.search(r"^grpcio-tools==([\d.]+)", (REPO / "requirements-dev.txt").read_text(), re.MULTILINE)
    assert match, "requirements-dev.txt must pin grpcio-tools==<version>"
    return match.group(1)


def test_committed_stubs_are_fresh(tmp_path: Path):
    installed = version("grpcio-tools")
    assert installed == pinned_grpc_tools(), f"grpcio-tools {installed} is installed: run `make setup` (pinned version)"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(PROTO),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *PROTOS,
        ],
        check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(PROTO / "python")
        for p in (PROTO / "python" / "deepgen").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert generated == committed, "stub files differ from the .proto files: run `make proto`"
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, PROTO / "python" / p, shallow=False)]
    assert not stale, f"stale stubs {stale}: run `make proto`"


@pytest.mark.parametrize("proto", PROTOS)
def test_every_field_enum_value_and_rpc_is_commented(proto: str):
    lines = (PROTO / proto).read_text().splitlines()
    element = re.compile(r"^\s*(rpc\s+\w+|(optional\s+|repeated\s+)?[\w.<>, ]+\s+\w+\s*=\s*\d+;|\w+\s*=\s*\d+;)")
    undocumented = []
    for i, line in enumerate(lines):
        if element.match(line) and "_UNSPECIFIED" not in line and "//" not in line:
            previous = lines[i - 1].strip() if i else ""
            if not previous.startswith("//"):
                undocumented.append(f"{proto}:{i + 1}: {line.strip()}")
    assert not undocumented, "document these contract elements:\n" + "\n".join(undocumented)


def test_stubs_import_and_describe_the_versioned_packages():
    from deepgen.eval.v1 import eval_pb2
    from deepgen.reward.v1 import reward_pb2

    assert reward_pb2.DESCRIPTOR.package == "deepgen.reward.v1"
    assert eval_pb2.DESCRIPTOR.package == "deepgen.eval.v1"
    assert set(reward_pb2.DESCRIPTOR.services_by_name["RewardService"].methods_by_name) == {"Score", "GetInfo"}


def test_stubs_run_on_the_oldest_protobuf_swanlab_accepts():
    """The gencode's runtime check asks for protobuf 6.31.1 at most (swanlab needs >= 6.31.1, < 7), and
    the gRPC stubs for the pinned grpcio-tools' version at most."""
    for path in sorted((PROTO / "python" / "deepgen").rglob("*_pb2.py")):
        assert "# Protobuf Python Version: 6.31.1\n" in path.read_text(), path
    for path in sorted((PROTO / "python" / "deepgen").rglob("*_pb2_grpc.py")):
        assert f"GRPC_GENERATED_VERSION = '{pinned_grpc_tools()}'" in path.read_text(), path
