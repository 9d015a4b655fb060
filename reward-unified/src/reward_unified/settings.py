"""Settings of reward-unified, from environment variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field

from deepgen_common.settings import ServiceSettings


class UnifiedSettings(ServiceSettings):
    http_port: int = Field(18087, ge=0, le=65535)
    grpc_port: int = Field(50052, ge=0, le=65535)

    judge_url: str = Field("http://unifiedreward-vllm:8000/v1", description="OpenAI-compatible base URL of vLLM.")
    judge_model: str = Field("UnifiedReward", description="Served model name of the judge.")
    templates_dir: Path = Field(Path("/data/templates"), description="Folder with the judge prompt templates.")
    workers: int = Field(
        32,
        ge=1,
        validation_alias=AliasChoices("UNIFIEDREWARD_THINK_WORKERS", "WORKERS"),
        description="Judge calls in flight at once, over all requests.",
    )
    both_orders: bool = Field(False, description="Judge every pair in both orders to cancel position bias.")
    judge_max_tokens: int = Field(2048, ge=16, description="Bound on the judge's answer length.")
    judge_timeout_s: float = Field(300.0, gt=0, description="Deadline of one judge call.")
    judge_max_attempts: int = Field(4, ge=1, description="Tries per judge call (transport errors, 429, 5xx).")
    judge_breaker_failures: int = Field(5, ge=1, description="Consecutive failed judge calls that open the breaker.")
    judge_breaker_reset_s: float = Field(10.0, gt=0, description="Seconds the open breaker waits before a trial.")
    judge_health_poll_s: float = Field(2.0, gt=0, description="How often readiness re-checks the judge's /health.")
    judge_extra_body: str = Field(
        "",
        description="JSON merged into every chat request. Tests use it to force answers with vLLM's "
        "structured_outputs; leave empty in production.",
    )

    @property
    def extra_body(self) -> dict[str, Any]:
        if not self.judge_extra_body:
            return {}
        value = json.loads(self.judge_extra_body)
        if not isinstance(value, dict):
            raise ValueError("JUDGE_EXTRA_BODY must be a JSON object")
        return value
