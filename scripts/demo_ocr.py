"""Start reward-ocr locally and score rendered sample images over gRPC and HTTP.

Usage: `make demo` (after `make setup`). Prints one row per sample and stops the service with
SIGTERM, as an orchestrator would.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

from PIL import Image, ImageDraw, ImageFont

from deepgen_common.client import RewardClient, wait_ready
from deepgen_common.types import Sample

SAMPLES = [
    (["GRAND OPENING"], 'A storefront banner that says "GRAND OPENING"'),
    (["GRAND OPNEING"], 'A storefront banner that says "GRAND OPENING"'),
    (["FRESH BREAD", "DAILY"], 'A bakery poster with "FRESH BREAD" and "DAILY"'),
    (["SALE 5O% 0FF"], 'A red sale tag reading "SALE 50% OFF"'),
    (["HELLO"], "A watercolor of a lighthouse at dawn"),
]


def render(lines: list[str]) -> bytes:
    image = Image.new("RGB", (512, 512), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=44)
    for i, line in enumerate(lines):
        draw.text((24, 200 + 80 * i), line, fill="black", font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    http_port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "HTTP_PORT": str(http_port),
        "GRPC_PORT": str(grpc_port),
        "LOG_FORMAT": "text",
        "LOG_LEVEL": "WARNING",
    }
    print(f"starting reward-ocr (HTTP :{http_port}, gRPC :{grpc_port}) ...", flush=True)
    service = subprocess.Popen([sys.executable, "-m", "reward_ocr"], env=env)
    try:
        try:
            wait_ready(f"http://127.0.0.1:{http_port}", alive=lambda: service.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            print(f"reward-ocr did not become ready: {exc}", file=sys.stderr)
            return 1
        samples = [Sample(render(lines), prompt) for lines, prompt in SAMPLES]
        for url in (f"grpc://127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"):
            with RewardClient(url) as client:
                start = time.perf_counter()
                results = client.score(samples)
                elapsed = time.perf_counter() - start
            print(f"\n{url}  ({len(samples)} images in {elapsed:.2f}s, backend {client.info().backend})")
            for (lines, prompt), result in zip(SAMPLES, results, strict=True):
                score = f"{result.score:.3f}" if result.score is not None else "-"
                print(f"  {result.outcome.value:<15} {score:>6}  image {' / '.join(lines)!r:<28} prompt {prompt!r}")
        return 0
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(30)
        print(f"\nreward-ocr stopped (exit code {service.returncode})")


if __name__ == "__main__":
    sys.exit(main())
