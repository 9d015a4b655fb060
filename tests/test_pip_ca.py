"""scripts/pip_ca.py (`make pip-ca`): pip's CA bundle found the way pip finds it, copied into the build
context, and PIP_CA_BUNDLE set in .env; the docker tests' helper uses the same code."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import REPO

PEM = b"-----BEGIN CERTIFICATE-----\nproxy CA\n-----END CERTIFICATE-----\n"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pip_ca", REPO / "scripts" / "pip_ca.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pip_ca = _load_script()

# `pip config list` where the cert is in /etc/pip.conf: `pip config get global.cert` says "No such key".
LISTING = (
    "global.cert='/etc/ssl/proxy.pem'\nglobal.extra-index-url='file:///opt/pypi/simple'\n:env:.default-timeout='180'\n"
)


def test_pip_cert_wins_over_the_configuration() -> None:
    assert pip_ca.find_pip_cert({"PIP_CERT": "/env.pem"}, LISTING) == ("/env.pem", "PIP_CERT")


def test_configuration_cert_is_read_from_the_listing() -> None:
    assert pip_ca.find_pip_cert({}, LISTING) == ("/etc/ssl/proxy.pem", "pip config global.cert")
    # pip install's precedence: the install section over the global one, the environment over both.
    listing = LISTING + 'install.cert="/install.pem"\n'
    assert pip_ca.find_pip_cert({}, listing) == ("/install.pem", "pip config install.cert")
    listing += ":env:.cert='/from-env-file.pem'\n"
    assert pip_ca.find_pip_cert({}, listing) == ("/from-env-file.pem", "pip config :env:.cert")


def test_no_cert_means_nothing_to_do(tmp_path: Path) -> None:
    listing = "global.index-url='https://pypi.org/simple'\n"
    assert pip_ca.find_pip_cert({}, listing) is None
    message = pip_ca.run(tmp_path, tmp_path / ".env", {}, listing)
    assert "nothing to do" in message
    assert "make pip-ca CA=" in message
    assert not (tmp_path / "build").exists()
    assert not (tmp_path / ".env").exists()


def test_bundle_is_copied_and_env_line_replaced(tmp_path: Path) -> None:
    ca = tmp_path / "proxy.pem"
    ca.write_bytes(PEM)
    repo = tmp_path / "repo"
    repo.mkdir()
    env_file = repo / ".env"
    env_file.write_text("OCR_URL=grpc://h:50051\nPIP_CA_BUNDLE=\nNGPUS=all\n")
    message = pip_ca.run(repo, env_file, {"PIP_CERT": str(ca)}, "")
    assert (repo / "build" / "pip-ca.pem").read_bytes() == PEM
    assert env_file.read_text() == "OCR_URL=grpc://h:50051\nPIP_CA_BUNDLE=build/pip-ca.pem\nNGPUS=all\n"
    assert f"copied {ca} (from PIP_CERT) to build/pip-ca.pem" in message
    pip_ca.run(repo, env_file, {"PIP_CERT": str(ca)}, "")  # idempotent: one line, no duplicate
    assert env_file.read_text().count("PIP_CA_BUNDLE=") == 1


def test_missing_bundle_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(pip_ca.PipCaError, match=r"/gone\.pem \(from PIP_CERT\) is not a file.*make pip-ca CA="):
        pip_ca.run(tmp_path, tmp_path / ".env", {"PIP_CERT": "/gone.pem"}, "")


def test_script_reads_pips_own_configuration(tmp_path: Path) -> None:
    """The real pip of this interpreter, its configuration in a file, no PIP_CERT: the issue's case."""
    ca = tmp_path / "proxy.pem"
    ca.write_bytes(PEM)
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\ncert = {ca}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = str(conf)
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pip_ca.py"), "--repo", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "build" / "pip-ca.pem").read_bytes() == PEM
    assert (tmp_path / ".env").read_text() == "PIP_CA_BUNDLE=build/pip-ca.pem\n"
    assert f"copied {ca} (from pip config global.cert)" in done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_target_passes_the_ca() -> None:
    done = subprocess.run(["make", "-C", str(REPO), "--no-print-directory", "-n", "pip-ca", "CA=/x/ca.pem"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.stdout.strip().endswith("scripts/pip_ca.py --ca /x/ca.pem")


def test_docker_tests_use_the_same_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.docker import dockerutil

    ca = tmp_path / "proxy.pem"
    ca.write_bytes(PEM)
    monkeypatch.setattr(dockerutil, "REPO", tmp_path)
    monkeypatch.setenv("PIP_CERT", str(ca))
    assert dockerutil.pip_ca_bundle() == "build/pip-ca.pem"
    assert (tmp_path / "build" / "pip-ca.pem").read_bytes() == PEM
    assert not (tmp_path / ".env").exists()  # the tests pass the bundle as a build argument
