"""The committed stubs match the .proto files, and every contract element is documented."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PROTO = REPO / "proto"
PROTOS = sorted(p.relative_to(PROTO).as_posix() for p in PROTO.glob("deepgen/**/*.proto"))


def test_committed_stubs_are_fresh(tmp_path: Path):
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
