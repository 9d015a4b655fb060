"""Recognise a `*_URL` that still points at one of the original DeepGen-RL's services, within seconds.

The original's users run its OCR service (Flask, pickled payloads over ``POST /``) and serve their VLM
judges with vLLM's OpenAI server, whose address they gave as ``UNIFIEDREWARD_THINK_URL`` /
``UNIGENBENCH_API_URL``. This trainer talks to reward-ocr, reward-unified and eval-unigenbench instead,
so such an address would only ever fail its readiness probe (``/readyz``) until the timeout. When an
HTTP address is not ready, `recognise_original_service` asks it two harmless questions:

- ``GET /v1/models`` answering an OpenAI model list: a vLLM (or other OpenAI-compatible) server. The
  fix is the one command that puts reward-unified / eval-unigenbench in front of that very server
  (``JUDGE_URL=<it>/v1``), so the user keeps the judge they already serve;
- ``POST /`` with an empty body answering with pickle bytes: the original OCR service (it answers
  any failure with a pickled error). The bytes are only checked for pickle's framing (protocol
  opcode first, STOP last); nothing from the network is ever unpickled.
"""

from __future__ import annotations

import httpx

from deepgen_common.client.urls import parse_service_url

PROBE_TIMEOUT_S = 3.0
# The service the trainer expects behind each variable: (package, its gRPC port, how to start it).
_EXPECTED = {
    "OCR_URL": ("reward-ocr", 50051, "python -m reward_ocr"),
    "UNIFIEDREWARD_THINK_URL": ("reward-unified", 50052, "python -m reward_unified"),
    "UNIGENBENCH_API_URL": ("eval-unigenbench", 50053, "python -m eval_unigenbench"),
}
_JUDGES = ("UNIFIEDREWARD_THINK_URL", "UNIGENBENCH_API_URL")


def recognise_original_service(variable: str, url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """The fix, when the HTTP address ``url`` of ``variable`` answers like one of the original's services;
    None when it does not (or answers nothing, or is a gRPC address)."""
    parsed = parse_service_url(url)
    if parsed.protocol != "http":
        return None
    service, grpc_port, command = _EXPECTED[variable]
    for part in parsed.split():
        base = part.base_url
        model = _openai_model(base, timeout_s)
        if model is not None:
            if variable not in _JUDGES:
                return (
                    f"{variable}={url} answers like an OpenAI-compatible (vLLM) server serving {model!r}, not "
                    f"{service}: start {service} ({command}) and point {variable} at it"
                )
            return (
                f"{variable}={url} is an OpenAI-compatible (vLLM) server serving {model!r}, as in the original "
                f"DeepGen-RL; this trainer talks to {service}, which calls that server for you. Start it in front "
                f"of the judge you already serve: JUDGE_URL={base}/v1 JUDGE_MODEL={model} "
                f"TEMPLATES_DIR=data/judges/templates HTTP_PORT=0 {command} (templates: make fetch-judge-data), then "
                f"set {variable}=grpc://localhost:{grpc_port}"
            )
        if _answers_with_pickle(base, timeout_s):
            return (
                f"{variable}={url} answers POST / with a pickle, like the original DeepGen-RL's OCR service "
                f"(nothing was unpickled); this trainer talks to {service}: start it ({command}, or "
                f"`docker compose up -d {service}`) and set {variable}=grpc://localhost:{grpc_port}"
            )
    return None


def _openai_model(base: str, timeout_s: float) -> str | None:
    try:
        reply = httpx.get(f"{base}/v1/models", timeout=timeout_s)
        body = reply.json() if reply.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if isinstance(body, dict) and body.get("object") == "list" and isinstance(body.get("data"), list):
        ids = [m.get("id") for m in body["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        return ids[0] if ids else "?"
    return None


def _answers_with_pickle(base: str, timeout_s: float) -> bool:
    try:
        reply = httpx.post(f"{base}/", content=b"", timeout=timeout_s)
    except httpx.HTTPError:
        return False
    data = reply.content
    # Protocol 2+ pickles open with PROTO (0x80) and a protocol number, and end with STOP ('.').
    return len(data) >= 3 and data[0] == 0x80 and 2 <= data[1] <= 5 and data.endswith(b".")
