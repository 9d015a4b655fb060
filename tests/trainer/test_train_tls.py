"""The trainer scores against a reward-ocr that requires a token, TLS and a client certificate: the
credentials reach the trainer's reward client from the environment (API_TOKEN, TLS_CA_FILE,
TLS_CLIENT_CERT_FILE, TLS_CLIENT_KEY_FILE), as in a multi-host deployment."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepgen_trainer.config import parse_args
from deepgen_trainer.train import train
from tests.common.test_auth_tls import load_make_certs
from tests.common.test_client_tls import start_secure_ocr
from tests.trainer.test_train import SMALL, metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "trainer-token"


def test_trainer_scores_ocr_over_mutual_tls_with_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    certs = load_make_certs().make_certs(tmp_path / "certs", ["reward-ocr"])
    service = start_secure_ocr(certs, TOKEN)
    for name, value in {
        "API_TOKEN": TOKEN,
        "TLS_CA_FILE": certs.ca_cert,
        "TLS_CLIENT_CERT_FILE": certs.client_cert,
        "TLS_CLIENT_KEY_FILE": certs.client_key,
    }.items():
        monkeypatch.setenv(name, str(value))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a shop sign that says "OPEN"\na poster with the words "HELLO WORLD"\n')
    dataset = tmp_path / "train.yaml"
    dataset.write_text(f"datasets:\n  - path: {prompts}\n    rewards: {{ocr: 1.0}}\n")
    try:
        cfg = parse_args(
            [*SMALL, "--dataset_config", str(dataset), "--ocr_url", f"grpcs://localhost:{service.grpc_port}",
             "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--save_steps", "1"],
            environ={},
        )  # fmt: skip
        train(cfg)
    finally:
        service.stop()
    [row] = metrics(tmp_path / "run").values()
    assert row["reward/ocr/fail_rate"] == 0.0
    assert row["reward/ocr/na_rate"] == 0.0
