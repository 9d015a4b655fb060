"""Make a private CA and TLS certificates for a multi-host DeepGen-RL stack.

    python scripts/make_certs.py --dest certs --hosts reward-host.example,10.0.0.5

writes into DEST:
- `ca.pem` (the CA certificate: give it to clients as TLS_CA_FILE and to servers as TLS_CLIENT_CA_FILE
  for mutual TLS) and `ca.key` (keep it off the service hosts; only this script needs it),
- `server.pem` + `server.key` (TLS_CERT_FILE / TLS_KEY_FILE of every service; valid for every name and
  IP in --hosts, plus the services' names on the compose network, localhost and 127.0.0.1),
- `client.pem` + `client.key` (a client certificate for mutual TLS: the trainer's),
- `prometheus.pem` + `prometheus.key` (the client certificate of the compose stack's Prometheus,
  monitoring/prometheus-tls.yml).
Keys are written with mode 0600: for the compose stack, give each key to the user that reads it
(`sudo chown 10001 certs/server.key certs/client.key`: the services and the trainer;
`sudo chown 65534 certs/prometheus.key`: Prometheus runs as nobody). Existing files are replaced
only with --force.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The services' names on the compose network (the trainer's grpcs://reward-ocr:50051, the `server_name`
# Prometheus checks, monitoring/prometheus-tls.yml), then the loopback names.
COMPOSE_HOSTS = ("reward-ocr", "reward-unified", "eval-unigenbench")
DEFAULT_HOSTS = (*COMPOSE_HOSTS, "localhost", "127.0.0.1")
log = logging.getLogger("make_certs")


@dataclass(frozen=True)
class CertFiles:
    """Paths of the files `make_certs` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    prometheus_cert: Path
    prometheus_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DeepGen-RL"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    subject: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    usage: list[x509.ObjectIdentifier],
    days: int,
    hosts: Sequence[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_certs(dest: Path, hosts: Sequence[str], days: int = 825, force: bool = False) -> CertFiles:
    """Write a new CA, a server certificate for `hosts` (plus DEFAULT_HOSTS) and the client certificates
    of the trainer and of Prometheus into `dest`; returns their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    stems = ("ca", "server", "client", "prometheus")
    files = CertFiles(*(dest / f"{stem}.{ext}" for stem in stems for ext in ("pem", "key")))
    existing = [str(p) for p in vars(files).values() if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(existing)} exist: pass --force to replace them (clients must then get the new ca.pem)"
        )
    names = list(dict.fromkeys([*hosts, *DEFAULT_HOSTS]))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("DeepGen-RL CA"))
        .issuer_name(_name("DeepGen-RL CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    # The server certificate may also authenticate as a client: a service's healthcheck presents it to
    # its own server under mutual TLS.
    server_usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    server_cert, server_key = _issue(names[0], ca_cert, ca_key, server_usage, days, names)
    client_usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
    client_cert, client_key = _issue("deepgen-client", ca_cert, ca_key, client_usage, days)
    prometheus_cert, prometheus_key = _issue("deepgen-prometheus", ca_cert, ca_key, client_usage, days)
    pem = serialization.Encoding.PEM
    _write(files.ca_cert, ca_cert.public_bytes(pem), private=False)
    _write(files.ca_key, _key_pem(ca_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(pem), private=False)
    _write(files.server_key, _key_pem(server_key), private=True)
    _write(files.client_cert, client_cert.public_bytes(pem), private=False)
    _write(files.client_key, _key_pem(client_key), private=True)
    _write(files.prometheus_cert, prometheus_cert.public_bytes(pem), private=False)
    _write(files.prometheus_key, _key_pem(prometheus_key), private=True)
    return files


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=Path("certs"), help="output folder (default: certs)")
    parser.add_argument(
        "--hosts",
        default="",
        help="comma-separated DNS names and IPs the services are reached at (the compose names, localhost and "
        "127.0.0.1 are always added)",
    )
    parser.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="make-certs: %(message)s")
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    try:
        files = make_certs(args.dest, hosts, args.days, args.force)
    except FileExistsError as exc:
        raise SystemExit(str(exc)) from None
    log.info(
        "wrote %s, %s (SANs: %s), %s, %s",
        files.ca_cert,
        files.server_cert,
        ", ".join(dict.fromkeys([*hosts, *DEFAULT_HOSTS])),
        files.client_cert,
        files.prometheus_cert,
    )
    log.info(
        "servers: TLS_CERT_FILE=%s TLS_KEY_FILE=%s [TLS_CLIENT_CA_FILE=%s]",
        files.server_cert,
        files.server_key,
        files.ca_cert,
    )
    log.info("clients: TLS_CA_FILE=%s; keep %s off the service hosts", files.ca_cert, files.ca_key)
    log.info(
        "compose: sudo chown 10001 %s %s; sudo chown 65534 %s (Prometheus; PROMETHEUS_CONFIG=prometheus-tls.yml)",
        files.server_key,
        files.client_key,
        files.prometheus_key,
    )


if __name__ == "__main__":
    main()
