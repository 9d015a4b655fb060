"""Test helpers: images with real rendered text, and a real service running in a background thread."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from deepgen_common.server import RunningService
from deepgen_common.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# The project's own judge templates and UniGenBench CSVs, written in the upstream formats (templates/,
# unigenbench/ as `make fetch-judge-data` lays them out), and prompt lists for the trainer's data.
JUDGE_FIXTURES = FIXTURES / "judge_data"
PROMPT_FIXTURES = FIXTURES / "prompts"


def upstream_judge_data() -> Path:
    """The upstream judge files, for parity tests only: `JUDGE_DATA_DIR` (relative to the repository, as in
    the Makefile), else `data/judges/`, else `../shared/data` beside the clone. Where none holds
    templates/ and unigenbench/ the test skips naming `make fetch-judge-data`; under CI=true it fails."""
    return _parity_files(
        "JUDGE_DATA_DIR",
        [REPO / "data" / "judges", REPO.parent / "shared" / "data"],
        lambda d: (d / "templates").is_dir() and (d / "unigenbench").is_dir(),
        "the upstream judge files: run `make fetch-judge-data` (or set JUDGE_DATA_DIR)",
    )


def original_files() -> Path:
    """The original DeepGen-RL's own files (launch script, DeepSpeed JSONs, YAMLs, MMEngine configs), for
    parity tests only: `ORIGINAL_DIR`, else `../shared/original` beside the clone. Where neither exists
    the test skips naming ORIGINAL_DIR; under CI=true it fails."""
    return _parity_files(
        "ORIGINAL_DIR",
        [REPO.parent / "shared" / "original"],
        lambda d: (d / "scripts" / "train.sh").is_file(),
        "the original DeepGen-RL's files: set ORIGINAL_DIR to a checkout of deepgenteam/deepgen_rl",
    )


def _parity_files(variable: str, candidates: list[Path], holds: Callable[[Path], bool], needs: str) -> Path:
    """The first folder that `holds` the files, the one `variable` names (relative to the repository)
    first; else skip the test naming what it needs (fail under CI=true, where they must be there)."""
    if os.environ.get(variable):
        candidates = [REPO / os.environ[variable], *candidates]
    for directory in candidates:
        if holds(directory):
            return directory
    message = f"parity test needs {needs}; looked in {', '.join(str(c) for c in candidates)}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def render_text(lines: list[str], size: tuple[int, int] = (512, 512), font_size: int = 44, fmt: str = "PNG") -> bytes:
    """Black text on white, one line per entry, in Pillow's bundled TrueType font (Aileron)."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)
    y = size[1] // 2 - len(lines) * font_size
    for line in lines:
        draw.text((24, y), line, fill="black", font=font)
        y += int(font_size * 1.8)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid grayscale PNG of width x height zeros: a few hundred KB that decode to width*height bytes."""

    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + zero pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png16(samples: list[list[list[int]]]) -> bytes:
    """A 16-bit PNG of rows of pixels, each a list of 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)
    samples in 0..65535; written by hand because Pillow saves 16-bit grayscale only."""
    channels = len(samples[0][0])
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\0" + b"".join(v.to_bytes(2, "big") for px in row for v in px) for row in samples)
    ihdr = len(samples[0]).to_bytes(4, "big") + len(samples).to_bytes(4, "big") + bytes([16, color_type, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def gray16_png(png: bytes) -> bytes:
    """The same picture as a 16-bit grayscale PNG (mode I;16): each 8-bit gray level v becomes v * 257."""
    wide = Image.open(io.BytesIO(png)).convert("L").convert("I").point(lambda v: v * 257).convert("I;16")
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


class ServiceThread:
    """A real service (gRPC + HTTP servers, real backend) on its own event loop in a thread."""

    def __init__(self, settings: ServiceSettings, make_component: Callable) -> None:
        self.settings = settings
        self.make_component = make_component
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.running: RunningService | None = None

    def start(self, wait_ready: bool = True, timeout_s: float = 120.0) -> ServiceThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout_s)
        if wait_ready:
            self.wait_ready(timeout_s)
        return self

    async def _start(self) -> None:
        self.running = RunningService(self.settings, self.make_component)
        await self.running.start()

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.running.service.ready():
            if time.monotonic() > deadline:
                raise TimeoutError("service did not become ready")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def grpc_port(self) -> int:
        return self.running.grpc_port

    @property
    def http_port(self) -> int:
        return self.running.http_port

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"
