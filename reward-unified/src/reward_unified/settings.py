"""Settings of reward-unified, from environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field

from deepgen_common.judge import JudgeSettings


class UnifiedSettings(JudgeSettings):
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
    max_group_size: int = Field(
        16,
        ge=2,
        description="Most samples in one group (a group of n costs n(n-1)/2 judge calls); larger: INVALID_ARGUMENT.",
    )
