"""Async client of an OpenAI-compatible chat server (vLLM) used by the judge adapters.

Deadlines per request, retries with backoff only on transport errors / 429 / 5xx, a circuit
breaker, a health probe, and vLLM's sleep / wake-up dev endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import Field, field_validator

from deepgen_common.client.breaker import CircuitBreaker, CircuitOpenError
from deepgen_common.client.reward_client import RetryPolicy
from deepgen_common.images import pass_on_image
from deepgen_common.settings import ServiceSettings
from deepgen_common.types import ImageFormat

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

    @classmethod
    def checked(cls, data: bytes, declared: ImageFormat, *, max_bytes: int, max_pixels: int) -> JudgeImage:
        """The image to send, after the checks the adapter owes its limits; raises ImageError. The judge
        decodes it, so only the header, the limits and the structure are checked (no pixel decode),
        except for a 16-bit grayscale PNG, re-encoded in 8 bits (see `pass_on_image`)."""
        return cls(*pass_on_image(data, declared, max_bytes=max_bytes, max_pixels=max_pixels))

    def content_part(self) -> dict[str, Any]:
        url = f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"
        return {"type": "image_url", "image_url": {"url": url}}


class JudgeSettings(ServiceSettings):
    """Settings every judge adapter shares: where the judge is and how it is called. Subclasses set
    the defaults of `judge_url`, `judge_model` and `workers`."""

    judge_url: str = Field(description="OpenAI-compatible base URL of vLLM, e.g. http://vllm:8000/v1.")
    judge_model: str = Field(description="Served model name of the judge.")
    workers: int = Field(32, ge=1, description="Judge calls in flight at once, over all requests.")
    judge_max_tokens: int = Field(2048, ge=16, description="Bound on the judge's answer length.")
    judge_timeout_s: float = Field(300.0, gt=0, description="Deadline of one judge call.")
    judge_max_attempts: int = Field(4, ge=1, description="Tries per judge call (transport errors, 429, 5xx).")
    judge_breaker_failures: int = Field(5, ge=1, description="Consecutive failed judge calls that open the breaker.")
    judge_breaker_reset_s: float = Field(10.0, gt=0, description="Seconds the open breaker waits before a trial.")
    judge_health_poll_s: float = Field(2.0, gt=0, description="How often readiness re-checks the judge's /health.")
    judge_extra_body: str = Field(
        "",
        description="JSON object merged into every chat request. Tests use it to force answers with vLLM's "
        "structured_outputs; leave empty in production.",
    )

    @field_validator("judge_extra_body")
    @classmethod
    def _json_object(cls, v: str) -> str:
        if v and not isinstance(json.loads(v), dict):
            raise ValueError("must be a JSON object")
        return v

    def judge_client(self, on_latency: Callable[[float], None] | None = None) -> JudgeClient:
        """The client these settings describe, with `workers` calls in flight at most."""
        return JudgeClient(
            self.judge_url,
            self.judge_model,
            timeout_s=self.judge_timeout_s,
            max_tokens=self.judge_max_tokens,
            retry=RetryPolicy(max_attempts=self.judge_max_attempts, initial_s=0.5, max_s=8.0),
            breaker=CircuitBreaker(
                f"judge {self.judge_url}",
                failure_threshold=self.judge_breaker_failures,
                reset_after_s=self.judge_breaker_reset_s,
            ),
            extra_body=json.loads(self.judge_extra_body) if self.judge_extra_body else {},
            max_in_flight=self.workers,
            on_latency=on_latency,
        )


class JudgeClient:
    """Chat completions against `base_url` (e.g. `http://vllm:8000/v1`) for `model`.

    `extra_body` is merged into every request; tests use it to force an answer format with vLLM's
    `structured_outputs`, production leaves it empty. At most `max_in_flight` chats run at once (the
    others wait their turn); `on_latency` receives each chat's seconds, retries included.
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
        max_in_flight: int = 64,
        on_latency: Callable[[float], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")
        self.model = model
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy(max_attempts=4, initial_s=0.5, max_s=8.0)
        self.breaker = breaker or CircuitBreaker(f"judge {self.base_url}", failure_threshold=5, reset_after_s=10.0)
        self.extra_body = dict(extra_body or {})
        self._slots = asyncio.Semaphore(max_in_flight)
        self._on_latency = on_latency
        limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
        self._http = httpx.AsyncClient(timeout=timeout_s, limits=limits)

    async def chat(self, images: list[JudgeImage], text: str, temperature: float = 0.0) -> str:
        """One user turn with the images first, then the text; returns the answer text.

        Temperature 0 by default (judgements must be reproducible). Raises JudgeUnavailable /
        JudgeRejected.
        """
        body = {
            "model": self.model,
            "messages": [
                {"role": "user", "content": [*(i.content_part() for i in images), {"type": "text", "text": text}]}
            ],
            "temperature": temperature,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }
        async with self._slots:
            start = time.perf_counter()
            try:
                reply = await self._post("/chat/completions", body)
            finally:
                if self._on_latency is not None:
                    self._on_latency(time.perf_counter() - start)
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


class HealthWatch:
    """Polls the judge's `/health`; `healthy` backs the adapter's readiness. A passing check after a
    failing one closes the breaker for every caller (the judge is back; no need to wait out the reset)."""

    def __init__(self, judge: JudgeClient, poll_s: float) -> None:
        self.judge = judge
        self.poll_s = poll_s
        self.healthy = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.healthy = await self.judge.healthy()
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            healthy = await self.judge.healthy()
            if healthy != self.healthy:
                log.warning("judge health changed", extra={"fields": {"url": self.judge.root_url, "healthy": healthy}})
                if healthy:
                    self.judge.breaker.record_success()
            self.healthy = healthy

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
