"""Reward outages: the trainer waits for its reward services at start and stops, with a checkpoint and
a message naming the reward, its URL variable and the last error, when one stays dead."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch

from deepgen_trainer.checkpoints.run_checkpoint import latest_checkpoint, load_checkpoint
from deepgen_trainer.rewards.outage import FailureWatch, RewardOutage, wait_for_reward_services
from deepgen_trainer.rewards.scorer import RewardStatus
from deepgen_trainer.train import main
from tests.trainer.test_learning import LEARN

OK, NA, ERR, DOWN, NOT = (
    RewardStatus.OK,
    RewardStatus.NOT_APPLICABLE,
    RewardStatus.ERROR,
    RewardStatus.UNAVAILABLE,
    RewardStatus.NOT_REQUESTED,
)


def status(*rows: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int8)


def test_failure_watch_counts_consecutive_all_failed_steps() -> None:
    watch = FailureWatch(["clip_sim", "ocr"], patience=3)
    assert watch.update(status((OK, DOWN), (OK, DOWN))) is None
    assert watch.update(status((OK, ERR), (OK, DOWN))) is None  # per-sample errors count as failures
    assert watch.update(status((OK, NOT), (OK, NOT))) is None  # not asked: the count stays at 2
    assert watch.failed_steps == {"clip_sim": 0, "ocr": 2}
    assert watch.update(status((OK, DOWN), (OK, NOT))) == "ocr"


@pytest.mark.parametrize("answer", [OK, NA])
def test_a_step_with_any_answer_resets_the_count(answer: int) -> None:
    watch = FailureWatch(["ocr"], patience=2)
    assert watch.update(status((DOWN,), (DOWN,))) is None
    assert watch.update(status((DOWN,), (answer,))) is None  # partial failure: masked, not fatal
    assert watch.failed_steps["ocr"] == 0
    assert watch.update(status((DOWN,), (DOWN,))) is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_service_that_is_not_ready_stops_the_start_naming_its_url_variable() -> None:
    url = f"grpc://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RewardOutage, match=rf"reward ocr: the service at OCR_URL={url} was not ready within 0.5 s"):
        wait_for_reward_services({"ocr": url}, timeout_s=0.5)
    assert time.monotonic() - start < 10


def write_inputs(tmp_path: Path) -> Path:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a picture of one thing\na picture of another thing\n")
    yaml = tmp_path / "train.yaml"
    yaml.write_text(f"datasets:\n  - path: {prompts}\n    rewards: {{clip_sim: 1.0, ocr: 1.0}}\n")
    return yaml


def test_trainer_exits_at_start_when_a_reward_service_is_not_ready(tmp_path: Path, caplog) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    argv = [*LEARN, "--dataset_config", str(write_inputs(tmp_path)), "--output_dir", str(tmp_path / "run"),
            "--ocr_url", url, "--reward_ready_timeout", "0.5"]  # fmt: skip
    assert main(argv) == 3
    assert f"OCR_URL={url} was not ready" in caplog.text
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("extra", [[], ["--one_step_off_policy"]], ids=["sync", "one-step-off-policy"])
def test_a_dead_service_stops_the_run_within_the_patience_with_a_checkpoint(
    tmp_path: Path, caplog, extra: list[str]
) -> None:
    # The service is dead from the start; --reward_ready_timeout 0 skips the start check so that the
    # failures happen during training. clip_sim (in process) keeps working: the steps still train.
    url = f"grpc://127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    argv = [*LEARN, "--dataset_config", str(write_inputs(tmp_path)), "--output_dir", str(out), "--ocr_url", url,
            "--reward_ready_timeout", "0", "--reward_failure_patience", "2", *extra]  # fmt: skip
    assert main(argv) == 3
    checkpoint = load_checkpoint(latest_checkpoint(out))
    assert checkpoint.step == 2  # stopped after the second all-failed step, not at --max_steps
    message = caplog.text
    assert "reward ocr failed for every sample it was asked for in 2 consecutive steps" in message
    assert f"OCR_URL={url}" in message
    assert "last error: " in message
    assert "last error: unknown" not in message
    assert str(checkpoint.path) in message
