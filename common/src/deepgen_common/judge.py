"""Async client of an OpenAI-compatible chat server (vLLM) used by the judge adapters.

Deadlines per request, retries with backoff only on transport errors / 429 / 5xx, a circuit
breaker, a health probe, and vLLM's sleep / wake-up dev endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from dataclasses import dataclass
from typing import Any

import httpx

from deepgen_common.client.breaker import CircuitBreaker, CircuitOpenError
from deepgen_common.client.reward_client import RetryPolicy

log = logging.getLogger(__name__)

_RETRYABLE = {429, 500, 502, 503, 504}


class JudgeUnavailable(ConnectionError):
    """The judge could not be reached or kept failing after retries (or its breaker is open)."""


class JudgeRejected(RuntimeError):
    """The judge answered with a non-retryable error (e.g. 400: prompt too long)."""


@dataclass(frozen=True)
class JudgeImage:
    """An encoded image to show the judge."""

    data: bytes
    mime: str = "image/png"

    def content_part(self) -> dict[str, Any]:
        url = f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"
        return {"type": "image_url", "image_url": {"url": url}}


class JudgeClient:
    """Chat completions against `base_url` (e.g. `http://vllm:8000/v1`) for `model`.

    `extra_body` is merged into every request; tests use it to force an answer format with vLLM's
    `structured_outputs`, production leaves it empty.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout_s: float = 300.0,
        max_tokens: int = 2048,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        extra_body: dict[str, Any] | None = None,
        max_connections: int = 64,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")
        self.model = model
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy(max_attempts=4, initial_s=0.5, max_s=8.0)
        self.breaker = breaker or CircuitBreaker(f"judge {self.base_url}", failure_threshold=5, reset_after_s=10.0)
        self.extra_body = dict(extra_body or {})
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(timeout=timeout_s, limits=limits)

    async def chat(self, images: list[JudgeImage], text: str) -> str:
        """One user turn with the images first, then the text; returns the answer text.

        Temperature 0 (judgements must be reproducible). Raises JudgeUnavailable / JudgeRejected.
        """
        body = {
            "model": self.model,
            "messages": [
                {"role": "user", "content": [*(i.content_part() for i in images), {"type": "text", "text": text}]}
            ],
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }
        reply = await self._post("/chat/completions", body)
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise JudgeRejected(f"judge reply has no message content: {str(reply)[:300]}") from None

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last = ""
        for attempt in range(self.retry.max_attempts):
            try:
                self.breaker.before_call()
            except CircuitOpenError as exc:
                raise JudgeUnavailable(str(exc)) from None
            try:
                response = await self._http.post(f"{self.base_url}{path}", json=body)
            except httpx.TransportError as exc:  # includes timeouts: a stuck judge is an outage here
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    self.breaker.record_success()
                    return response.json()
                if response.status_code not in _RETRYABLE:
                    self.breaker.record_success()  # it answered; the request was wrong
                    raise JudgeRejected(f"judge answered HTTP {response.status_code}: {response.text[:300]}")
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            self.breaker.record_failure()
            if attempt + 1 < self.retry.max_attempts:
                await asyncio.sleep(self.retry.delay(attempt))
        raise JudgeUnavailable(f"judge at {self.base_url} failed after {self.retry.max_attempts} attempts: {last}")

    async def healthy(self, timeout_s: float = 5.0) -> bool:
        """vLLM's `GET /health` is 200."""
        try:
            return (await self._http.get(f"{self.root_url}/health", timeout=timeout_s)).status_code == 200
        except httpx.TransportError:
            return False

    async def sleep(self, level: int = 1) -> None:
        """Free the judge's GPU memory (vLLM sleep mode; needs `VLLM_SERVER_DEV_MODE=1`)."""
        await self._dev_call("POST", f"/sleep?level={level}")

    async def wake_up(self) -> None:
        await self._dev_call("POST", "/wake_up")

    async def is_sleeping(self) -> bool:
        return bool((await self._dev_call("GET", "/is_sleeping")).get("is_sleeping"))

    async def _dev_call(self, method: str, path: str) -> dict[str, Any]:
        try:
            response = await self._http.request(method, f"{self.root_url}{path}", timeout=120)
        except httpx.TransportError as exc:
            raise JudgeUnavailable(f"{path} on {self.root_url}: {exc}") from None
        if response.status_code != 200:
            raise JudgeRejected(
                f"{path} answered HTTP {response.status_code}: {response.text[:200]} "
                "(is the server started with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1?)"
            )
        return response.json() if response.content else {}

    async def close(self) -> None:
        await self._http.aclose()
