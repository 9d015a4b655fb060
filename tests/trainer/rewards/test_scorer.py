"""deepgen_trainer.rewards.clip_sim and deepgen_trainer.rewards.scorer: the tiny CLIP, the scorer against the real
reward-ocr service (real RapidOCR), NaN for N/A and failures, overlap, group plumbing, metrics."""

from __future__ import annotations

import io
import logging
import math
import socket
import threading
from collections.abc import Sequence

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from torch.testing import assert_close

from deepgen_common.client import CircuitBreaker, RetryPolicy, RewardClient
from deepgen_common.types import Mode, Result, Sample
from deepgen_trainer.rewards.clip_sim import ClipSimReward, build_tiny_clip
from deepgen_trainer.rewards.scorer import (
    LocalReward,
    RemoteReward,
    RewardScorer,
    RewardStatus,
    build_reward,
    reward_metrics,
)
from tests.helpers import render_text

NAN = math.nan
S = RewardStatus


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _images(*texts: str) -> torch.Tensor:
    """uint8 (N, 512, 512, 3): one rendered line of text per image (the decoder's output format)."""
    return torch.from_numpy(np.stack([_pixels(render_text([t])) for t in texts]))


def _random_images(n: int, seed: int, size: tuple[int, int] = (40, 56)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *size, 3), generator=g, dtype=torch.uint8)


# --- clip_sim ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip() -> ClipSimReward:
    return build_tiny_clip(seed=0)


def test_clip_sim_shape_range_and_parity_with_clip_forward(tiny_clip: ClipSimReward):
    images = _random_images(5, seed=1)
    prompts = ["a cat", 'a sign that says "OPEN"', "x", "", "a very long prompt " * 20]
    scores = tiny_clip(images, prompts)
    assert scores.shape == (5,)
    assert scores.dtype == torch.float32
    assert bool(((scores >= -1) & (scores <= 1)).all())
    # Reference: CLIPModel's own forward gives logits_per_text = scale · cos(text, image); its
    # diagonal divided by the scale is the cosine of each image with its own prompt.
    pil = [Image.fromarray(a.numpy()) for a in images]
    text = tiny_clip.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    pixels = tiny_clip.image_processor(images=pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = tiny_clip.model(**text, pixel_values=pixels)
    reference = out.logits_per_text.diagonal() / tiny_clip.model.logit_scale.exp()
    assert_close(scores, reference)
    assert_close(tiny_clip(pil, prompts), scores)  # PIL input is the same as the tensor


def test_clip_sim_does_not_depend_on_batch_composition(tiny_clip: ClipSimReward):
    images = _random_images(6, seed=2)
    prompts = ["short", 'a much longer prompt with "quoted text" in it', "b", "c d e", "f", "g"]
    together = tiny_clip(images, prompts)
    alone = torch.cat([tiny_clip(images[i : i + 1], prompts[i : i + 1]) for i in range(6)])
    assert_close(together, alone)
    tiny_clip.batch_size = 4  # chunked internally: 4 + 2
    try:
        assert_close(tiny_clip(images, prompts), together)
    finally:
        tiny_clip.batch_size = 32


def test_clip_sim_save_and_load_round_trip(tiny_clip: ClipSimReward, tmp_path):
    tiny_clip.save_pretrained(tmp_path)
    loaded = ClipSimReward.from_pretrained(tmp_path)
    images = _random_images(3, seed=3)
    prompts = ["one", "two", 'three "3"']
    assert_close(loaded(images, prompts), tiny_clip(images, prompts), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="CLIP_MODEL_NAME_OR_PATH"):
        ClipSimReward.from_pretrained(tmp_path / "missing")


def test_clip_sim_rejects_bad_input(tiny_clip: ClipSimReward):
    with pytest.raises(ValueError, match="uint8"):
        tiny_clip(torch.zeros(2, 8, 8, 3), ["a", "b"])
    with pytest.raises(ValueError, match="one prompt per image"):
        tiny_clip(_random_images(2, seed=4), ["a"])


# --- the scorer against the real reward-ocr service --------------------------------------------------


class CountingClient:
    """The real RewardClient, recording every sample it is asked to send."""

    def __init__(self, client: RewardClient) -> None:
        self.client = client
        self.sent: list[Sample] = []

    def score(self, samples: Sequence[Sample], mode: Mode = Mode.POINTWISE) -> list[Result]:
        self.sent.extend(samples)
        return self.client.score(samples, mode)

    def close(self) -> None:
        self.client.close()


class GatedClient(CountingClient):
    """The real RewardClient, holding every call until `gate` is set (to observe overlap)."""

    def __init__(self, client: RewardClient) -> None:
        super().__init__(client)
        self.gate = threading.Event()

    def score(self, samples: Sequence[Sample], mode: Mode = Mode.POINTWISE) -> list[Result]:
        assert self.gate.wait(30)
        return super().score(samples, mode)


def _scored_items(service) -> float:
    text = httpx.get(f"{service.http_url}/metrics").text
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "deepgen_items_total"
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_ocr_scores_quoted_prompts_and_leaves_unquoted_ones_nan(ocr_service):
    scorer = RewardScorer({"ocr": RemoteReward(RewardClient(ocr_service.http_url))})
    with scorer:
        batch = scorer.score(
            _images("HELLO", "HELLO"), ['a sign that says "HELLO"', "a plain sign"], ["g0", "g1"], torch.ones(2, 1)
        )
    assert batch.names == ("ocr",)
    assert batch.rewards.dtype == torch.float32
    assert batch.rewards[0, 0].item() == pytest.approx(1.0, abs=0.05)
    assert math.isnan(batch.rewards[1, 0].item())  # not applicable is NaN, never 0.0
    assert batch.status[:, 0].tolist() == [S.OK, S.NOT_APPLICABLE]
    metrics = reward_metrics(batch.names, batch.rewards, batch.status)
    assert metrics["reward/ocr/na_rate"] == 0.5
    assert metrics["reward/ocr/fail_rate"] == 0.0
    assert metrics["reward/ocr/mean"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.integration
def test_zero_weight_samples_are_never_sent(ocr_service):
    client = CountingClient(RewardClient(ocr_service.grpc_url))
    before = _scored_items(ocr_service)
    with RewardScorer({"ocr": RemoteReward(client)}) as scorer:
        batch = scorer.score(
            _images("ALPHA", "BETA", "GAMMA"),
            ['"ALPHA"', '"BETA"', '"GAMMA"'],
            ["g0", "g1", "g2"],
            torch.tensor([[1.0], [0.0], [0.5]]),
        )
    assert [s.prompt for s in client.sent] == ['"ALPHA"', '"GAMMA"']
    assert _scored_items(ocr_service) - before == 2  # the service's own count agrees
    assert all(s.image.startswith(b"\x89PNG") for s in client.sent)
    assert batch.status[:, 0].tolist() == [S.OK, S.NOT_REQUESTED, S.OK]
    assert math.isnan(batch.rewards[1, 0].item())
    assert batch.rewards[0, 0].item() == pytest.approx(1.0, abs=0.05)


def test_a_service_that_is_down_gives_nan_and_counts_failures(caplog):
    url = f"http://127.0.0.1:{_closed_port()}"
    client = RewardClient(
        url, retry=RetryPolicy(max_attempts=2, initial_s=0.01, max_s=0.02), breaker=CircuitBreaker(url, 2)
    )
    images = _random_images(2, seed=5)
    with RewardScorer({"ocr": RemoteReward(client)}) as scorer, caplog.at_level(logging.WARNING):
        first = scorer.score(images, ['"A"', '"B"'], ["g0", "g1"], torch.ones(2, 1))
        second = scorer.score(images, ['"A"', '"B"'], ["g0", "g1"], torch.ones(2, 1))  # circuit now open
    for batch in (first, second):
        assert torch.isnan(batch.rewards).all()  # NaN, not 0.0, and no exception
        assert batch.status[:, 0].tolist() == [S.UNAVAILABLE, S.UNAVAILABLE]
    assert scorer.call_failures == {"ocr": 2}
    assert "reward ocr failed for 2 samples" in caplog.text
    metrics = reward_metrics(first.names, first.rewards, first.status)
    assert metrics["reward/ocr/fail_rate"] == 1.0
    assert metrics["reward/ocr/na_rate"] == 0.0
    assert math.isnan(metrics["reward/ocr/mean"])


@pytest.mark.integration
def test_submit_returns_while_scoring_and_gather_keeps_order(ocr_service, tiny_clip: ClipSimReward):
    ocr = GatedClient(RewardClient(ocr_service.http_url))
    rewards = {"clip_sim": LocalReward(tiny_clip), "ocr": RemoteReward(ocr)}
    weights = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    with RewardScorer(rewards) as scorer:
        first = scorer.submit(_images("ONE", "TWO"), ['"ONE"', "two"], ["g0", "g1"], weights)
        second = scorer.submit(_images("THREE", "FOUR"), ['"THREE"', '"FOUR"'], ["g2", "g3"], weights)
        # The caller is free to generate the next micro-batch while the OCR calls wait.
        assert not first.done()
        assert not second.done()
        ocr.gate.set()
        batch = scorer.gather([first, second])
    assert batch.group_ids == ("g0", "g1", "g2", "g3")
    assert batch.wait_s > 0
    assert batch.status[:, 1].tolist() == [S.OK, S.NOT_REQUESTED, S.OK, S.NOT_REQUESTED]
    assert batch.rewards[[0, 2], 1].tolist() == pytest.approx([1.0, 1.0], abs=0.05)
    # The two micro-batches are scored concurrently: their requests may reach the service in either order.
    assert sorted(s.prompt for s in ocr.sent) == ['"ONE"', '"THREE"']
    # clip_sim ran in-process on every row and agrees with scoring the images directly.
    assert batch.status[:, 0].tolist() == [S.OK] * 4
    expected = tiny_clip(
        torch.cat([_images("ONE", "TWO"), _images("THREE", "FOUR")]), ['"ONE"', "two", '"THREE"', '"FOUR"']
    )
    assert_close(batch.rewards[:, 0], expected)


# --- group mode --------------------------------------------------------------------------------------


class BrightnessJudgeStandIn:
    """In-process stand-in for reward-unified in group mode: the real judge is a UnifiedReward-Think
    VLM behind a vLLM server, which cannot run here. Like the service, it scores pairs within each
    group id of a request and returns win rates (the brighter image wins each pair); it records the
    requests it got so the test can check which samples were sent together."""

    def __init__(self) -> None:
        self.requests: list[list[Sample]] = []

    def score(self, samples: Sequence[Sample], mode: Mode = Mode.POINTWISE) -> list[Result]:
        assert mode is Mode.GROUP
        self.requests.append(list(samples))
        brightness = [float(np.asarray(Image.open(io.BytesIO(s.image))).mean()) for s in samples]
        results = []
        for i, s in enumerate(samples):
            mates = [j for j, t in enumerate(samples) if t.group_id == s.group_id and j != i]
            wins = sum(brightness[i] > brightness[j] for j in mates)
            results.append(Result.ok(wins / len(mates)) if mates else Result.not_applicable())
        return results


def _flat_images(levels: list[int]) -> torch.Tensor:
    return torch.tensor(levels, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 8, 8, 3).contiguous()


def test_group_mode_sends_whole_groups_and_keeps_only_weighted_scores():
    judge = BrightnessJudgeStandIn()
    with RewardScorer({"unifiedreward_think": RemoteReward(judge, Mode.GROUP)}) as scorer:
        batch = scorer.score(
            _flat_images([10, 30, 20, 5, 6, 7, 50, 40, 60]),
            ["p0"] * 3 + ["p1"] * 3 + ["p2"] * 3,
            ["g0"] * 3 + ["g1"] * 3 + ["g2"] * 3,
            torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]).view(9, 1),
        )
    # g1 (all weights 0) is not sent; g2 is sent whole although its middle sample has weight 0.
    [request] = judge.requests
    assert [s.group_id for s in request] == ["g0"] * 3 + ["g2"] * 3
    # Win rates within each group, by hand: g0 brightness 10, 30, 20 -> 0, 1, 0.5; g2 50, 40, 60 -> 0.5, (0), 1.
    assert_close(batch.rewards[:, 0], torch.tensor([0.0, 1.0, 0.5, NAN, NAN, NAN, 0.5, NAN, 1.0]), equal_nan=True)
    assert batch.status[:, 0].tolist() == [S.OK] * 3 + [S.NOT_REQUESTED] * 3 + [S.OK, S.NOT_REQUESTED, S.OK]


def test_a_group_split_over_micro_batches_is_an_error():
    with RewardScorer({"unifiedreward_think": RemoteReward(BrightnessJudgeStandIn(), Mode.GROUP)}) as scorer:
        first = scorer.submit(_flat_images([1, 2]), ["p", "p"], ["g0", "g0"], torch.ones(2, 1))
        second = scorer.submit(_flat_images([3, 4]), ["p", "q"], ["g0", "g1"], torch.ones(2, 1))
        with pytest.raises(ValueError, match="multiple of rollout_n"):
            scorer.gather([first, second])


# --- validation and metrics --------------------------------------------------------------------------


def test_reward_names_are_a_closed_set_and_inputs_are_checked():
    with pytest.raises(ValueError, match="valid rewards: clip_sim, ocr, unifiedreward_think"):
        RewardScorer({"aesthetic": LocalReward(lambda images, prompts: torch.zeros(len(prompts)))})
    with pytest.raises(ValueError, match="UNIFIEDREWARD_THINK_URL"):
        build_reward("unifiedreward_think")
    with pytest.raises(ValueError, match="clip=ClipSimReward"):
        build_reward("clip_sim")
    reward = build_reward("ocr", url="grpc://127.0.0.1:1")
    assert isinstance(reward, RemoteReward)
    assert reward.mode is Mode.POINTWISE
    reward.client.close()
    with RewardScorer({"unifiedreward_think": RemoteReward(BrightnessJudgeStandIn(), Mode.GROUP)}) as scorer:
        with pytest.raises(ValueError, match=r"weights must be \(N, K\) = \(2, 1\)"):
            scorer.submit(_flat_images([1, 2]), ["a", "b"], ["g", "g"], torch.ones(2, 2))
        with pytest.raises(ValueError, match="needs a group id"):
            scorer.submit(_flat_images([1, 2]), ["a", "b"], ["g", ""], torch.ones(2, 1))


def test_reward_metrics_by_hand():
    names = ("ocr", "clip_sim", "unifiedreward_think")
    rewards = torch.tensor(
        [[0.5, 0.2, NAN], [NAN, 0.4, NAN], [1.0, NAN, NAN], [NAN, NAN, NAN], [NAN, 0.6, NAN]], dtype=torch.float32
    )
    status = torch.tensor(
        [
            [S.OK, S.OK, S.NOT_REQUESTED],
            [S.NOT_APPLICABLE, S.OK, S.NOT_REQUESTED],
            [S.OK, S.ERROR, S.NOT_REQUESTED],
            [S.UNAVAILABLE, S.NOT_REQUESTED, S.NOT_REQUESTED],
            [S.NOT_REQUESTED, S.OK, S.NOT_REQUESTED],
        ],
        dtype=torch.int8,
    )
    metrics = reward_metrics(names, rewards, status)
    # ocr: 4 requested; OK 0.5 and 1.0 -> mean 0.75, std sqrt(((0.25)² + (0.25)²)/1) = 0.353553;
    # 1 N/A -> na_rate 1/4; 1 UNAVAILABLE -> fail_rate 1/4.
    # clip_sim: 4 requested; OK 0.2, 0.4, 0.6 -> mean 0.4, std 0.2; 1 ERROR -> fail_rate 1/4.
    # unifiedreward_think: requested for no sample -> no entries.
    assert metrics == pytest.approx(
        {
            "reward/ocr/mean": 0.75,
            "reward/ocr/std": math.sqrt(0.125),
            "reward/ocr/fail_rate": 0.25,
            "reward/ocr/na_rate": 0.25,
            "reward/clip_sim/mean": 0.4,
            "reward/clip_sim/std": 0.2,
            "reward/clip_sim/fail_rate": 0.25,
            "reward/clip_sim/na_rate": 0.0,
        }
    )
