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
# (tests/trainer/checkpoints/test_safe_pickle.py shows hostile payloads never run).
RESTRICTED_UNPICKLER = REPO / "trainer" / "src" / "deepgen_trainer" / "checkpoints" / "safe_pickle.py"


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


# --- deployment defaults (issue 8, finding 10) -----------------------------------------------------------


def compose(name: str = "docker-compose.yml") -> dict:
    import yaml

    return yaml.safe_load((REPO / name).read_text())


def test_grafana_has_no_working_default_password():
    grafana = compose()["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    # Grafana would fall back to admin/admin on an empty password: its entrypoint refuses to start instead.
    assert 'test -n "$$GF_SECURITY_ADMIN_PASSWORD"' in " ".join(grafana["entrypoint"])
    assert re.search(r"^GRAFANA_ADMIN_PASSWORD=$", (REPO / ".env.example").read_text(), flags=re.MULTILINE)


def test_multinode_instructions_publish_with_token_and_tls_never_on_all_interfaces():
    header = "\n".join(
        line for line in (REPO / "docker-compose.multinode.yml").read_text().splitlines() if line.startswith("#")
    )
    assert "BIND_ADDRESS=0.0.0.0" not in header
    for needed in ("make certs", "API_TOKEN", "TLS_CERT_FILE", "TLS_CA_FILE", "grpcs://"):
        assert needed in header, needed


def test_services_listen_on_all_interfaces_only_inside_compose_and_drain_before_sigkill():
    from deepgen_common.settings import ServiceSettings

    limits = compose()["x-service-limits"]
    assert limits["HOST"] == "0.0.0.0"  # inside the compose network; `ports` picks the host interface
    grace = float(re.search(r"\d+", limits["SHUTDOWN_GRACE_S"].split(":-")[1]).group())
    stop = compose()["x-service-defaults"]["stop_grace_period"]
    assert grace < float(stop.rstrip("s"))
    assert ServiceSettings.model_fields["host"].default == "127.0.0.1"
    for name in ("reward-ocr", "reward-unified", "eval-unigenbench"):
        for port in compose()["services"][name].get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), port
