"""Service URL parsing: every form a `*_URL` may take, and the errors for the ones it may not."""

from __future__ import annotations

import pytest

from deepgen_common.client.urls import Address, ServiceURL, parse_service_url


@pytest.mark.parametrize(
    ("url", "protocol", "tls", "addresses"),
    [
        ("http://reward-ocr:18082", "http", False, [("reward-ocr", 18082)]),
        ("https://reward-ocr:18082/", "http", True, [("reward-ocr", 18082)]),
        ("http://example.org", "http", False, [("example.org", 80)]),
        ("https://example.org", "http", True, [("example.org", 443)]),
        ("grpc://reward-ocr:50051", "grpc", False, [("reward-ocr", 50051)]),
        ("GRPCS://Reward-OCR:50051", "grpc", True, [("reward-ocr", 50051)]),
        ("grpc://127.0.0.1:50051,127.0.0.1:50061", "grpc", False, [("127.0.0.1", 50051), ("127.0.0.1", 50061)]),
        (" http://h1:1, h2:2 ", "http", False, [("h1", 1), ("h2", 2)]),
        ("grpcs://[::1]:50051,[fe80::1]:7", "grpc", True, [("::1", 50051), ("fe80::1", 7)]),
    ],
)
def test_scheme_forms(url: str, protocol: str, tls: bool, addresses: list[tuple[str, int]]):
    parsed = parse_service_url(url)
    assert (parsed.protocol, parsed.tls) == (protocol, tls)
    assert parsed.addresses == tuple(Address(h, p) for h, p in addresses)
    assert parse_service_url(str(parsed)) == parsed  # the printed form parses back


def test_split_gives_one_url_per_address():
    parts = parse_service_url("grpcs://h1:1,[::1]:2").split()
    assert [str(p) for p in parts] == ["grpcs://h1:1", "grpcs://[::1]:2"]
    assert [p.grpc_target for p in parts] == ["dns:///h1:1", "dns:///[::1]:2"]
    assert parse_service_url("https://h:8443").base_url == "https://h:8443"


@pytest.mark.parametrize("url", ["dns:///reward-ocr:50051", "ipv4:127.0.0.1:1,127.0.0.1:2", "unix:/tmp/s.sock"])
def test_grpc_native_targets_pass_through(url: str):
    parsed = parse_service_url(url)
    assert parsed == ServiceURL("grpc", False, native=url)
    assert parsed.split() == [parsed]
    assert parsed.grpc_target == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x", r"unsupported service URL 'ftp://x': use http://host:port"),
        ("reward-ocr:50051", "unsupported service URL"),
        ("grpc://", "names no address"),
        ("grpc://reward-ocr", r"needs a port \(grpc://host:port\)"),
        ("http://h:1/v1/score", "has a path, query, fragment or credentials"),
        ("http://user:secret@h:1", r"the token goes in API_TOKEN"),
        ("http://h:1,,h:2", "empty address"),
        ("http://h:1,h:1", "lists an address twice"),
        ("http://h:99999", "bad address"),
        ("http://h:0", "port 0"),
        ("http://a:b:1", "bad"),
    ],
)
def test_bad_urls_say_what_to_write(url: str, message: str):
    with pytest.raises(ValueError, match=message):
        parse_service_url(url)


def test_one_address_accessors_refuse_lists():
    url = parse_service_url("http://h1:1,h2:2")
    with pytest.raises(ValueError, match="lists 2 addresses; split"):
        _ = url.base_url
    with pytest.raises(ValueError, match="not a gRPC URL"):
        _ = url.grpc_target
