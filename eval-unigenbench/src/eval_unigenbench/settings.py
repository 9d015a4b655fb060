"""Settings of eval-unigenbench, from environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, field_validator

from deepgen_common.judge import JudgeSettings
from eval_unigenbench.answers import AnswerRules


class EvalSettings(JudgeSettings):
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(50053, ge=0, le=65535)

    judge_url: str = Field("http://unigenbench-vllm:8000/v1", description="OpenAI-compatible base URL of vLLM.")
    judge_model: str = Field("UniGenBench-EvalModel-qwen3vl-32b-v1", description="Served model name of the judge.")
    workers: int = Field(
        32,
        ge=1,
        validation_alias=AliasChoices("UNIGENBENCH_WORKERS", "WORKERS"),
        description="Judge calls in flight at once, over all runs.",
    )
    templates_dir: Path = Field(Path("/data/templates"), description="Folder with the judge template files.")
    unigenbench_data_dir: Path = Field(Path("/data/unigenbench"), description="Folder with test_prompts_*.csv.")
    benchmark: str = Field(
        "test_prompts_en",
        description="Benchmark file stems in UNIGENBENCH_DATA_DIR, comma-separated (test_prompts_en,test_prompts_zh); "
        "each is a set named by its stem without test_prompts_ (en, zh), the first is the default.",
    )
    prompt_limit: int = Field(0, ge=0, description="Serve only the first N prompts (0: all); for quick evals.")
    duplicates: int = Field(1, ge=1, le=64, description="Images the trainer generates per prompt.")
    unigenbench_answer_rules: AnswerRules = Field(
        "official",
        description="How the judge's answer is read: official (the UniGenBench evaluation code's rules, as the "
        "leaderboard) or tolerant (also accepts full-width lists, quoted scores, a missing analysis).",
    )
    parse_retries: int = Field(
        10,
        ge=0,
        description="Extra judge calls for an image whose answer cannot be parsed (10: as many tries as the "
        "official evaluation code).",
    )
    retry_temperature: float = Field(
        0.7,
        ge=0,
        le=2,
        description="Sampling temperature of those retries (at temperature 0 a retry repeats the same answer).",
    )
    results_dir: Path = Field(Path("/data/results"), description="Where each run's CSV and JSON are written.")
    max_open_runs: int = Field(4, ge=1, description="Runs open at once; StartRun beyond it is RESOURCE_EXHAUSTED.")
    run_idle_timeout_s: float = Field(
        600.0,
        gt=0,
        description="An open run with no client call and no judgement in flight for this long expires: what it "
        "judged is written (to a folder ending in -expired), then it is forgotten.",
    )
    sleep_between_runs: bool = Field(
        False,
        description="Put the judge to sleep after each run and wake it at the next StartRun (vLLM sleep mode, for "
        "a judge that shares its GPUs).",
    )
    peer_judge_url: str = Field(
        "",
        description="vLLM that shares the judge's GPUs (e.g. http://unifiedreward-vllm:8000): put to sleep while a "
        "run is open, woken when it finishes. Empty: none.",
    )
    peer_judge_model: str = Field("UnifiedReward", description="Served name of the peer (for its client only).")

    @property
    def benchmark_paths(self) -> dict[str, Path]:
        """Set name ("en", "zh_long") -> benchmark CSV, in the order BENCHMARK lists them."""
        stems = [stem.strip() for stem in self.benchmark.split(",") if stem.strip()]
        return {stem.removeprefix("test_prompts_"): self.unigenbench_data_dir / f"{stem}.csv" for stem in stems}

    @field_validator("benchmark")
    @classmethod
    def _some_benchmark(cls, v: str) -> str:
        stems = [stem.strip() for stem in v.split(",") if stem.strip()]
        if not stems:
            raise ValueError("name at least one benchmark file stem, e.g. BENCHMARK=test_prompts_en")
        if len(set(stems)) != len(stems):
            raise ValueError(f"lists a benchmark twice: {v!r}")
        return v
