"""A pass-through proxy in front of the real vLLM test server that forces the judge's answers.

A random model has no opinions, so tests decide what it answers: for every chat request the proxy
asks `force(text)` (the request's text part) for a regex and adds it as vLLM's `structured_outputs`
before forwarding; vLLM then really generates an answer matching it. Everything else (`/health`,
`/sleep`, `/wake_up`, ...) is forwarded unchanged and recorded. Stopping the proxy takes the judge
away from the adapter exactly as a stopped vLLM would (connection refused), and it restarts on the
same port in milliseconds instead of vLLM's ~35 s.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response


class ForcingProxy:
    def __init__(self, upstream_root: str, force: Callable[[str], str | None]) -> None:
        self.upstream_root = upstream_root.rstrip("/")
        self.force = force
        self.chat_texts: list[str] = []  # the text of every chat request, in arrival order
        self.other_calls: list[str] = []  # "POST /sleep", ... (health checks excluded)
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self) -> FastAPI:
        app = FastAPI()
        client = httpx.AsyncClient(timeout=120)

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def forward(path: str, request: Request) -> Response:
            url = f"{self.upstream_root}/{path}"
            body = await request.body()
            if path == "v1/chat/completions":
                payload = await request.json()
                text = payload["messages"][0]["content"][-1]["text"]
                self.chat_texts.append(text)
                regex = self.force(text)
                if regex is not None:
                    payload["structured_outputs"] = {"regex": regex}
                upstream = await client.post(url, json=payload)
            else:
                if path != "health":
                    self.other_calls.append(f"{request.method} /{path}")
                upstream = await client.request(request.method, url, params=request.query_params, content=body)
            return Response(upstream.content, upstream.status_code, media_type=upstream.headers.get("content-type"))

        return app

    def start(self) -> ForcingProxy:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self._app(), log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve(sockets=[sock])), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("proxy did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop at once, dropping requests in flight, like a killed server (the port is kept for `start`)."""
        assert self._server is not None
        assert self._thread is not None
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(10)
