"""HTTP bodies of unknown size (chunked, no content-length) are read one at a time, and the one read
keeps the others waiting until it holds its bytes in the in-flight budget: under many concurrent
maximum-size chunked bodies at most one is in memory beyond what the budget counts. Real reward-ocr
behind a real HTTP server on port 0; whether the server has read a body is seen from the client: a
body far larger than the socket buffers is sent to its end only once the server reads it."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from deepgen_common.reward_api import reward_component
from reward_ocr.backend import OcrBackend
from reward_ocr.settings import OcrSettings
from tests.conftest import ocr_settings
from tests.helpers import ServiceThread, render_text

pytestmark = pytest.mark.integration

MiB = 1 << 20
LIMIT = 16 * MiB  # MAX_REQUEST_BYTES and the in-flight budget: one such body fills it
CHUNK = 64 * 1024
OCR = reward_component(OcrBackend)


def settings(**overrides: object) -> OcrSettings:
    return ocr_settings(
        ocr_executor="thread", ocr_workers=1, max_request_bytes=LIMIT, max_image_bytes=1 * MiB, **overrides
    )


def padded_body() -> bytes:
    """A one-sample score request padded with JSON whitespace to exactly LIMIT bytes."""
    sample = {"image": {"data": base64.b64encode(render_text(["CHUNK"])).decode()}, "prompt": '"CHUNK"'}
    body = json.dumps({"samples": [sample]}).encode()
    return body + b" " * (LIMIT - len(body))


class Upload:
    """A body sent in CHUNK pieces from a thread; `sent` once its last piece went out, and, when
    `hold` is given, paused after its first piece until `hold` is set."""

    def __init__(self, body: bytes, hold: threading.Event | None = None) -> None:
        self.body = body
        self.hold = hold
        self.sent = threading.Event()
        self.status: int | None = None

    def pieces(self) -> Iterator[bytes]:
        for offset in range(0, len(self.body), CHUNK):
            yield self.body[offset : offset + CHUNK]
            if self.hold is not None:
                self.hold.wait(60)
        self.sent.set()

    def post(self, url: str, headers: dict[str, str]) -> threading.Thread:
        def run() -> None:
            self.status = httpx.post(url, content=self.pieces(), headers=headers, timeout=120).status_code

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


def hold_the_budget(service: ServiceThread, body: bytes) -> tuple[Upload, threading.Event, threading.Thread]:
    """Start a body of declared size that takes the whole budget before it is read, then is sent slowly
    until the returned event is set."""
    release = threading.Event()
    holder = Upload(body, hold=release)
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    thread = holder.post(f"{service.http_url}/v1/score", headers)
    wait_until(lambda: service.running.guards.budget.used >= LIMIT, "the declared body never took the budget")
    return holder, release, thread


def wait_until(condition: Callable[[], bool], message: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def test_concurrent_chunked_bodies_wait_unread_until_the_one_read_holds_its_budget():
    service = ServiceThread(settings(), OCR).start()
    body = padded_body()
    try:
        holder, release, held = hold_the_budget(service, body)
        chunked = [Upload(body) for _ in range(3)]
        threads = [u.post(f"{service.http_url}/v1/score", {"content-type": "application/json"}) for u in chunked]
        wait_until(lambda: any(u.sent.is_set() for u in chunked), "no chunked body was read")
        time.sleep(1.0)  # time for any other body to be read, were it let through
        # One chunked body read and waiting for budget; the others still unread, on the client.
        assert sum(u.sent.is_set() for u in chunked) == 1
        release.set()
        for thread in [held, *threads]:
            thread.join(120)
        assert [u.status for u in [holder, *chunked]] == [200] * 4
    finally:
        service.stop()


def test_chunked_bodies_waiting_for_their_turn_are_refused_after_max_queue_wait():
    service = ServiceThread(settings(max_queue_wait_s=1.0), OCR).start()
    body = padded_body()
    try:
        holder, release, held = hold_the_budget(service, body)
        chunked = [Upload(body) for _ in range(3)]
        threads = [u.post(f"{service.http_url}/v1/score", {"content-type": "application/json"}) for u in chunked]
        for thread in threads:  # refused while the budget is still held: none waits without end
            thread.join(60)
        assert [u.status for u in chunked] == [429] * 3
        release.set()
        held.join(120)
        assert holder.status == 200
    finally:
        service.stop()
