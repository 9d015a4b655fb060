"""No pickle, eval or exec anywhere in product code (the reference unpickled request bodies), except
the one reviewed module that reads other tools' checkpoints through a restricted unpickler."""

from __future__ import annotations

import re

from tests.helpers import REPO

COMPONENTS = ["common", "reward-ocr", "reward-unified", "eval-unigenbench", "trainer", "proto"]
FORBIDDEN = re.compile(
    r"\bimport\s+(c?pickle|dill|marshal|shelve)\b|\bfrom\s+(c?pickle|dill|marshal|shelve)\s+import"
    r"|(?<![.\w])(eval|exec)\s*\(|\btorch\.load\s*\((?![^)]*weights_only\s*=\s*True)"
)

# Checkpoints of DeepSpeed / mmengine / xtuner hold pickled objects; this module unpickles them with an
# allowlist, placeholders for unknown classes and a refusal of every other call
# (tests/trainer/test_safe_pickle.py shows hostile payloads never run).
RESTRICTED_UNPICKLER = REPO / "trainer" / "src" / "deepgen_trainer" / "safe_pickle.py"


def product_sources() -> list:
    files = []
    for component in COMPONENTS:
        files += [p for p in (REPO / component).rglob("*.py") if "_pb2" not in p.name and ".venv" not in p.parts]
    return files


def test_the_scan_sees_the_product_code():
    names = {p.name for p in product_sources()}
    assert {"grpc_server.py", "http_server.py", "backend.py", "scoring.py"} <= names


def test_no_unsafe_deserialisation_or_dynamic_code():
    hits = [
        f"{p.relative_to(REPO)}:{n}: {line.strip()}"
        for p in product_sources()
        if p != RESTRICTED_UNPICKLER
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert not hits, "unsafe calls in product code:\n" + "\n".join(hits)


def test_the_restricted_unpickler_is_the_only_exception_and_restricts():
    text = RESTRICTED_UNPICKLER.read_text()
    assert "def find_class(self, module: str, name: str)" in text
    assert "pickle_module=_RESTRICTED_PICKLE" in text  # its one torch.load goes through the allowlist


def test_the_pattern_catches_what_it_must():
    for bad in [
        "import pickle",
        "from pickle import loads",
        "x = eval(body)",
        "exec(code)",
        "torch.load(path)",
        "import dill",
    ]:
        assert FORBIDDEN.search(bad), bad
    for fine in ["model.eval()", "torch.load(path, weights_only=True)", "evaluate(x)", "self.exec_mode"]:
        assert not FORBIDDEN.search(fine), fine
