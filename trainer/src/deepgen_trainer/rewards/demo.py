"""`python -m deepgen_trainer.demo_reward`: a learnable image reward served through the reward contract.

The tiny random DeepGen cannot learn to render text or please a judge, but it can learn to make its
images brighter or darker within a few dozen steps. This service scores an image by its mean
brightness, (mean of the RGB values)/255 in [0, 1] (``DEMO_REWARD_OBJECTIVE=bright``), or by one
minus it (``dark``, the opposite objective), so a learning curve that rises in both cases shows the
whole loop works: rollout, the reward contract over gRPC or HTTP, advantages, update.

It is a real reward service built from the service kit (gRPC + HTTP, health, metrics, limits), served
pointwise; the trainer reaches it where it reaches any pointwise remote reward (``OCR_URL``), as
`make demo-learn` and the learning test do. Settings from the environment: ``HTTP_PORT`` (18089),
``GRPC_PORT`` (50059), ``DEMO_REWARD_OBJECTIVE``, ``DEMO_REWARD_LATENCY_S`` (a fixed delay per request,
which makes it the slow reward of `make bench-train`) and the kit's shared ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from deepgen_common.errors import ImageError
from deepgen_common.images import decode_image
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.reward_api import reward_component
from deepgen_common.server import main
from deepgen_common.settings import ServiceSettings
from deepgen_common.types import Mode, Result, Sample

Objective = Literal["bright", "dark"]


class DemoRewardSettings(ServiceSettings):
    http_port: int = Field(18089, ge=0, le=65535)
    grpc_port: int = Field(50059, ge=0, le=65535)
    demo_reward_objective: Objective = Field("bright", description="bright: mean brightness; dark: 1 − it.")
    demo_reward_latency_s: float = Field(
        0.0, ge=0.0, description="Seconds every request takes before it is answered (a slow judge, for benchmarks)."
    )


def brightness(rgb: np.ndarray) -> float:
    """Mean of the RGB values of a uint8 (H, W, 3) image, scaled to [0, 1]."""
    return float(rgb.astype(np.float64).mean() / 255.0)


class BrightnessBackend:
    """Scores each image by its mean brightness (or darkness); no model to load."""

    name = "demo-reward"
    version = "1"
    capabilities = (Mode.POINTWISE,)

    def __init__(self, settings: DemoRewardSettings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.description = f"mean brightness ({settings.demo_reward_objective})"
        # Requests wait on a timer, not on a worker: every queued sample is in work at once.
        self.workers = settings.max_queued_samples
        self._ready = False

    async def load(self) -> None:
        self._ready = True

    def ready(self) -> bool:
        return self._ready

    def waiting_for(self) -> dict[str, str]:
        return {} if self._ready else {"demo_reward": "starting"}

    async def score(self, samples: Sequence[Sample], mode: Mode) -> list[Result]:
        if self.settings.demo_reward_latency_s:
            await asyncio.sleep(self.settings.demo_reward_latency_s)
        results = []
        for sample in samples:
            start = time.perf_counter()
            results.append(self._score_one(sample))
            if self.metrics is not None:
                self.metrics.observe_sample_seconds(time.perf_counter() - start)
        return results

    def _score_one(self, sample: Sample) -> Result:
        limits = self.settings
        try:
            image = decode_image(
                sample.image, sample.image_format, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
            )
        except ImageError as exc:
            return Result.failed(str(exc))
        value = brightness(np.asarray(image.convert("RGB")))
        return Result.ok(value if self.settings.demo_reward_objective == "bright" else 1.0 - value)

    async def close(self) -> None:
        self._ready = False


def make_backend(settings: DemoRewardSettings, metrics: ServiceMetrics) -> BrightnessBackend:
    return BrightnessBackend(settings, metrics)


def serve() -> None:
    """Run the service until SIGTERM (settings from the environment)."""
    main(DemoRewardSettings, reward_component(make_backend))


if __name__ == "__main__":
    serve()
