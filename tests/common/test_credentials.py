"""Client credentials from the environment: token, trust roots, client certificate."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepgen_common.client import ClientCredentials


def test_unset_and_empty_variables_mean_none():
    assert ClientCredentials.from_env({}) == ClientCredentials()
    assert ClientCredentials.from_env({"API_TOKEN": "", "TLS_CA_FILE": ""}) == ClientCredentials()
    assert ClientCredentials().grpc_metadata == ()
    assert ClientCredentials().http_headers == {}


def test_token_goes_in_both_transports_headers(tmp_path: Path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until TLS is used")
    creds = ClientCredentials.from_env({"API_TOKEN": "s3cret", "TLS_CA_FILE": str(ca)})
    assert creds == ClientCredentials(token="s3cret", ca_file=str(ca))
    assert creds.grpc_metadata == (("authorization", "Bearer s3cret"),)
    assert creds.http_headers == {"authorization": "Bearer s3cret"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TLS_CA_FILE": "/nonexistent/ca.pem"}, "TLS_CA_FILE='/nonexistent/ca.pem' is not a readable file"),
        ({"TLS_CLIENT_CERT_FILE": "/x.pem"}, "set both TLS_CLIENT_CERT_FILE and TLS_CLIENT_KEY_FILE"),
        ({"API_TOKEN": "two words"}, "API_TOKEN must be non-empty and contain no whitespace"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str):
    with pytest.raises(ValueError, match=message):
        ClientCredentials.from_env(env)
