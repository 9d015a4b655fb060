"""Learning, proven: the tiny DeepGen, trained against a learnable image reward served by a real
service through the reward contract (`deepgen_trainer.rewards.demo`), raises its reward.

Each case trains 20 steps in process and regresses the per-step reward on the step: the slope's
t-statistic must be large (a rising curve, not noise). The opposite objective (darkness instead of
brightness) must rise too, so the loop follows the reward rather than drifting one way; and the same
holds with --one_step_off_policy, with two optimizer steps per rollout, with cps_sde's exact
log-prob (well scaled by the std floor), with GRPO-Guard on cps_sde and on flowgrpo_sde, and with
DiffusionNFT on- and off-policy (each update rule once towards each objective)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from deepgen_common.client import RewardClient
from deepgen_common.reward_api import reward_component
from deepgen_common.types import ImageFormat, Sample
from deepgen_trainer.config import parse_args
from deepgen_trainer.model.tiny import TINY_IMAGE_SIZE
from deepgen_trainer.observe.reward_plot import summarize
from deepgen_trainer.rewards.demo import DemoRewardSettings, make_backend
from deepgen_trainer.train import train
from tests.helpers import ServiceThread, render_text

STEPS = 20
# 2 prompts × 4 images, 4 SDE steps (2 trained), lr 2e-2: a trend within 20 steps of a tiny model. The
# clip range is PPO's usual 0.2: at this learning rate a one-step-stale policy or a second optimizer step
# moves the ratios far past the seed's 1e-4, which would clip nearly every sample.
LEARN = [
    "--model", "tiny", "--report_to", "none", "--no-bf16", "--deepspeed", "none", "--rollout_n", "4",
    "--prompts_per_rank", "2", "--rollout_micro_batch_size", "4", "--atrain_micro_batch_size", "8",
    "--num_inference_steps", "4", "--timestep_fraction", "0.5", "--image_height", str(TINY_IMAGE_SIZE),
    "--image_width", str(TINY_IMAGE_SIZE), "--learning_rate", "2e-2", "--clip_range", "0.2", "--warmup_steps", "0",
    "--beta", "0", "--save_steps", "1000", "--max_steps", str(STEPS),
]  # fmt: skip


def demo_reward(objective: str) -> ServiceThread:
    settings = DemoRewardSettings(
        host="127.0.0.1", http_port=0, grpc_port=0, demo_reward_objective=objective, log_format="text"
    )
    return ServiceThread(settings, reward_component(make_backend)).start()


@pytest.fixture(scope="module")
def services():
    running = {objective: demo_reward(objective) for objective in ("bright", "dark")}
    yield running
    for service in running.values():
        service.stop()


def test_demo_reward_scores_brightness_over_both_transports(services) -> None:
    white, black = render_text([]), render_text(["████████"], font_size=120)
    for transport in ("http_url", "grpc_url"):
        with RewardClient(getattr(services["bright"], transport)) as client:
            results = client.score([Sample(white, "a", ImageFormat.PNG), Sample(black, "b", ImageFormat.PNG)])
        assert results[0].score == pytest.approx(1.0)
        assert 0.0 < results[1].score < 1.0
    with RewardClient(services["dark"].http_url) as client:
        (dark,) = client.score([Sample(white, "a", ImageFormat.PNG)])
    assert dark.score == pytest.approx(0.0)
    bad = httpx.post(
        f"{services['bright'].http_url}/v1/score",
        json={"samples": [{"image": {"data": "bm90IGFuIGltYWdl", "format": "png"}, "prompt": "x"}]},
    )
    assert bad.status_code == 200
    assert bad.json()["results"][0]["outcome"] == "ERROR"


@pytest.mark.parametrize(
    ("objective", "transport", "extra"),
    [
        ("bright", "http_url", []),
        ("dark", "http_url", []),
        ("bright", "http_url", ["--one_step_off_policy"]),
        ("bright", "grpc_url", ["--optimizer_steps_per_rollout", "2"]),
        ("dark", "http_url", ["--exact_logprob"]),
        ("bright", "http_url", ["--atrain_algorithm", "grpoguard"]),
        # flowgrpo_sde at 4 steps and η = 1 adds noise of std ≈ 1 per step (its σ/(1 − σ) near σ = 1): no
        # trend in 20 steps with either rule (flowgrpo t = 4.0 dark at a third of this slope, GRPO-Guard
        # t < 3); at 6 steps GRPO-Guard's t is 11 (bright) and 38 (dark).
        (
            "dark", "grpc_url",
            ["--atrain_algorithm", "grpoguard", "--atrain_sde_sampler", "flowgrpo_sde", "--num_inference_steps", "6"],
        ),
        ("bright", "http_url", ["--atrain_algorithm", "diffusionnft"]),
        ("dark", "http_url", ["--atrain_algorithm", "diffusionnft", "--atrain_nft_off_policy"]),
    ],
    ids=[
        "bright", "opposite-objective", "one-step-off-policy", "two-optimizer-steps", "cps-exact-logprob",
        "grpoguard-cps", "grpoguard-flowgrpo-sde-opposite", "diffusionnft", "diffusionnft-off-policy-opposite",
    ],
)  # fmt: skip
def test_tiny_model_learns_the_served_reward(
    tmp_path: Path, services, objective: str, transport: str, extra: list[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a picture of thing number {i}" for i in range(64)) + "\n")
    yaml = tmp_path / "train.yaml"
    yaml.write_text(
        "sampling_mode: sample_proportional\n"
        f"datasets:\n  - name: demo\n    path: {prompts}\n    sample_weight: 1.0\n    rewards: {{ocr: 1.0}}\n"
    )
    out = tmp_path / "run"
    url = getattr(services[objective], transport)
    argv = [*LEARN, "--dataset_config", str(yaml), "--output_dir", str(out), "--ocr_url", url, *extra]
    train(parse_args(argv, environ={}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [row["reward/total"] for row in rows]
    assert len(rewards) == STEPS
    assert all(row["reward/ocr/fail_rate"] == 0 for row in rows)
    if "grpoguard" in extra:  # one optimizer step per rollout: RatioNorm of the rollout's own μ_old, log p_old is 1
        assert all(row["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6) for row in rows)
    curve = summarize(rewards)
    assert curve.slope > 0, rewards
    assert curve.t > 3, (curve, rewards)  # one-sided p < 0.005 with 18 degrees of freedom
