"""benchmarks/bench_learn.py's bookkeeping (not its figures): the tiny model's shapes for the FLOP
count, when a run reaches the gain, and the table's ratios to flowgrpo."""

from __future__ import annotations

from benchmarks.bench_learn import Curve, flops_per_step, steps_to_gain, summarize, tiny_shape
from benchmarks.flops import StepShape, model_flops, step_flops
from deepgen_trainer.config import TrainConfig
from deepgen_trainer.model.tiny import build_tiny
from tests.test_flops import TINY


def test_tiny_shape_is_the_flop_models_tiny_deepgen_and_off_policy_nft_pays_for_v_old() -> None:
    shape = tiny_shape(build_tiny())
    assert shape == TINY
    flow = TrainConfig(model="tiny", rollout_n=4, prompts_per_rank=2, rollout_micro_batch_size=4,
                       atrain_micro_batch_size=8, num_inference_steps=4, timestep_fraction=0.5, beta=0.0)  # fmt: skip
    nft = TrainConfig(**{**flow.to_dict(), "report_to": (), "atrain_algorithm": "diffusionnft"})
    nft_off = TrainConfig(**{**nft.to_dict(), "report_to": (), "atrain_nft_off_policy": True})
    assert flops_per_step(flow, shape) == flops_per_step(nft, shape)
    parts = step_flops(StepShape.from_train_config(flow, sftaux=False), shape)
    assert flops_per_step(flow, shape) == model_flops(parts)
    assert flops_per_step(nft_off, shape) == model_flops(parts) + parts["update: DiT forward"]


def _curve(rewards: list[float]) -> Curve:
    return Curve(rewards, [10e9 * (i + 1) for i in range(len(rewards))], [2.0 * (i + 1) for i in range(len(rewards))])


def test_gain_is_reached_by_the_smoothed_curve_and_the_table_gives_ratios() -> None:
    # Smoothed over 3 steps: (0.50, 0.51, 0.52) → 0.51 at index 2; (0.51, 0.52, 0.53) → 0.52 ≥ 0.5 + 0.02 at 3.
    slow = _curve([0.50, 0.51, 0.52, 0.53, 0.54])
    assert steps_to_gain(slow, 0.02) == 3
    fast = _curve([0.50, 0.53, 0.56, 0.57, 0.58])  # (0.50, 0.53, 0.56) → 0.53 at index 2
    assert steps_to_gain(fast, 0.02) == 2
    assert steps_to_gain(_curve([0.5, 0.5, 0.5, 0.5]), 0.02) is None
    lines = summarize({"flowgrpo": [slow, slow], "diffusionnft": [fast, fast], "never": [_curve([0.5] * 5)] * 2}, 0.02)
    flow, nft, never = lines[2].split(), lines[3].split(), lines[4].split()
    assert flow[:4] == ["flowgrpo", "2/2", "4", "40.00"]
    assert flow[6] == "1.00"
    assert nft[:4] == ["diffusionnft", "2/2", "3", "30.00"]
    assert nft[6] == "0.75"
    assert never[:3] == ["never", "0/2", "-"]
