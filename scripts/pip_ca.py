"""pip's CA bundle for the image builds (`make pip-ca [CA=/path/to/ca.pem]`).

Behind a proxy that re-signs TLS, pip inside `docker build` finds no versions unless it trusts the
proxy's CA, which the build gets as PIP_CA_BUNDLE: a PEM file inside the build context. This finds the
bundle that pip on this machine trusts, the way pip does: PIP_CERT, else the `cert` of pip's merged
configuration (`pip config list`: `:env:.cert`, then `install.cert`, then `global.cert`). `pip config get
global.cert` is not enough: without --global/--site it reads the user's file only, so it answers "No
such key" for a cert set in /etc/pip.conf or in PIP_CERT. The bundle is copied to build/pip-ca.pem and
`PIP_CA_BUNDLE=build/pip-ca.pem` is written to .env (created if missing). Where pip uses its own CA
store there is nothing to do, and the script says so. The docker tests build with the same bundle
(tests/docker/dockerutil.py calls `prepare_bundle`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE_IN_CONTEXT = "build/pip-ca.pem"  # relative to the build context, the repository root
ENV_KEY = "PIP_CA_BUNDLE"
# pip's precedence for `pip install`: the environment over the install section over the global one.
CONFIG_KEYS = (":env:.cert", "install.cert", "global.cert")


class PipCaError(RuntimeError):
    """pip names a CA bundle that cannot be used; the message says how to fix it."""


def pip_config_listing(python: str = sys.executable) -> str:
    """`pip config list` of `python`'s pip ("" when that interpreter has no pip)."""
    done = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=False
    )
    return done.stdout if done.returncode == 0 else ""


def find_pip_cert(environ: Mapping[str, str], listing: str) -> tuple[str, str] | None:
    """(path, where it was set) of the CA bundle pip trusts, from PIP_CERT or a `pip config list`
    listing; None when pip uses its own store."""
    if environ.get("PIP_CERT"):
        return environ["PIP_CERT"], "PIP_CERT"
    config: dict[str, str] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            config[key.strip()] = value.strip().strip("'\"")
    for key in CONFIG_KEYS:
        if config.get(key):
            return config[key], f"pip config {key}"
    return None


def copy_bundle(source: Path, repo: Path) -> str:
    """Copy `source` to `repo`/build/pip-ca.pem (left alone when equal, so the build cache holds);
    returns its path inside the build context."""
    target = repo / BUNDLE_IN_CONTEXT
    content = source.read_bytes()
    if not target.is_file() or target.read_bytes() != content:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")  # concurrent test workers never see half a file
        tmp.write_bytes(content)
        tmp.replace(target)
    return BUNDLE_IN_CONTEXT


def set_env_line(env_file: Path, key: str, value: str) -> None:
    """`key=value` in `env_file`: replaces the line that sets `key`, else appends one (file created)."""
    lines = env_file.read_text().splitlines() if env_file.is_file() else []
    setting = f"{key}={value}"
    kept = [setting if line.split("=", 1)[0].strip() == key else line for line in lines]
    if setting not in kept:
        kept.append(setting)
    env_file.write_text("\n".join(kept) + "\n")


def locate(environ: Mapping[str, str], listing: str, cert: str | None = None) -> tuple[Path, str] | None:
    """(bundle, where it was named): `cert` when given, else pip's (`find_pip_cert`); None when pip uses
    its own store. Raises `PipCaError` when the named file is missing."""
    found = (cert, "CA") if cert else find_pip_cert(environ, listing)
    if found is None:
        return None
    path, where = found
    if not Path(path).is_file():
        raise PipCaError(
            f"pip's CA bundle {path} (from {where}) is not a file: fix {where}, or pass the proxy's CA "
            "explicitly: make pip-ca CA=/path/to/ca.pem"
        )
    return Path(path), where


def prepare_bundle(repo: Path, environ: Mapping[str, str], listing: str) -> str:
    """pip's CA bundle copied into the build context: its path there, "" when pip uses its own store."""
    found = locate(environ, listing)
    return copy_bundle(found[0], repo) if found else ""


def run(repo: Path, env_file: Path, environ: Mapping[str, str], listing: str, cert: str | None = None) -> str:
    """Copy the bundle and set PIP_CA_BUNDLE in `env_file`; returns what was done, in one sentence."""
    found = locate(environ, listing, cert)
    if found is None:
        return (
            "pip on this machine uses its own CA store (no PIP_CERT, no cert in `pip config list`): nothing to "
            "do, the image builds trust PyPI's usual certificates. Behind a proxy that re-signs TLS, pass its "
            "CA: make pip-ca CA=/path/to/ca.pem"
        )
    bundle = copy_bundle(found[0], repo)
    set_env_line(env_file, ENV_KEY, bundle)
    return f"copied {found[0]} (from {found[1]}) to {bundle} and set {ENV_KEY}={bundle} in {env_file}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ca", default=None, help="a PEM bundle to use instead of pip's (the proxy's CA)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the build context (default: this repository)")
    parser.add_argument("--env-file", type=Path, default=None, help="the compose .env (default: REPO/.env)")
    args = parser.parse_args(argv)
    env_file = args.env_file or args.repo / ".env"
    try:
        print(run(args.repo, env_file, os.environ, pip_config_listing(), args.ca))
    except PipCaError as exc:
        print(f"make pip-ca: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
