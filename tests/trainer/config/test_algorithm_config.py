"""--atrain_algorithm and its knobs (deepgen_trainer.config): the original's flags and defaults, its
ATRAIN_* environment knobs as flag defaults (the command line wins, the log names each source), and
the one-line notices where the original's flags would ask for one of its defects."""

from __future__ import annotations

import logging

import pytest

from deepgen_trainer.config import ALGORITHMS, ConfigError, TrainConfig, parse_args

KNOBS = {
    "ATRAIN_NFT_BETA": ("atrain_nft_beta", "0.5"),
    "ATRAIN_NFT_ADV_CLIP_RANGE": ("atrain_nft_adv_clip_range", "2.0"),
    "ATRAIN_ADV_CLIP_MAX": ("adv_clip", "3.0"),
    "ATRAIN_GRPOGUARD_HIGHCLIP_RANGE": ("clip_range_high", "0.0003"),
}


def test_the_originals_flags_and_defaults() -> None:
    cfg = parse_args([], environ={})
    assert ALGORITHMS == ("flowgrpo", "grpoguard", "diffusionnft")
    assert (cfg.atrain_algorithm, cfg.atrain_nft_beta, cfg.atrain_nft_adv_clip_range) == ("flowgrpo", 0.1, 5.0)
    assert (cfg.atrain_nft_off_policy, cfg.clip_range_high, cfg.adv_clip) == (False, None, 5.0)
    argv = ["--atrain_algorithm", "diffusionnft", "--atrain_nft_beta", "0.2", "--atrain_nft_adv_clip_range", "4"]
    cfg = parse_args([*argv, "--atrain_nft_off_policy"], environ={})
    assert (cfg.atrain_nft_beta, cfg.atrain_nft_adv_clip_range, cfg.atrain_nft_off_policy) == (0.2, 4.0, True)


def test_env_knobs_are_defaults_the_command_line_wins_and_the_log_says_which(caplog) -> None:
    env = {var: value for var, (_, value) in KNOBS.items()}
    with caplog.at_level(logging.INFO, logger="deepgen_trainer"):
        cfg = parse_args(["--atrain_nft_beta", "0.3"], environ=env)
    assert cfg.atrain_nft_beta == 0.3  # the flag, not ATRAIN_NFT_BETA=0.5 (the original let the env win)
    assert (cfg.atrain_nft_adv_clip_range, cfg.adv_clip, cfg.clip_range_high) == (2.0, 3.0, 0.0003)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("algorithm flowgrpo")]
    assert "--atrain_nft_beta 0.3 (command line, over ATRAIN_NFT_BETA=0.5)" in line
    assert "--atrain_nft_adv_clip_range 2.0 (env ATRAIN_NFT_ADV_CLIP_RANGE)" in line
    assert "--adv_clip 3.0 (env ATRAIN_ADV_CLIP_MAX)" in line
    assert "--clip_range_high 0.0003 (env ATRAIN_GRPOGUARD_HIGHCLIP_RANGE)" in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deepgen_trainer"):
        parse_args([], environ={})
    assert any("--atrain_nft_beta 0.1 (default)" in r.getMessage() for r in caplog.records)


def test_a_bad_env_knob_names_the_variable_and_switches_without_meaning_get_a_notice(caplog) -> None:
    with pytest.raises(
        ConfigError, match=r"ATRAIN_NFT_BETA='x' is not a number \(it is the default of --atrain_nft_beta\)"
    ):
        parse_args([], environ={"ATRAIN_NFT_BETA": "x"})
    with pytest.raises(ConfigError, match=r"--atrain_nft_beta \(ATRAIN_NFT_BETA\) must be in \(0, 1\]"):
        parse_args([], environ={"ATRAIN_NFT_BETA": "0"})
    with caplog.at_level(logging.INFO, logger="deepgen_trainer"):
        parse_args([], environ={"ATRAIN_GRPOGUARD_PAPER_IMPL": "1"})
    assert any(
        "ATRAIN_GRPOGUARD_PAPER_IMPL=1 has no effect: GRPO-Guard always" in r.getMessage() for r in caplog.records
    )


def test_an_nft_flag_without_diffusionnft_has_no_effect_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    # The original accepts --atrain_nft_off_policy with any algorithm; it only acts under diffusionnft.
    with caplog.at_level(logging.INFO, logger="deepgen_trainer"):
        cfg = parse_args(["--atrain_nft_off_policy"], environ={})
    assert cfg.atrain_algorithm == "flowgrpo"
    assert "--atrain_nft_off_policy has no effect with --atrain_algorithm flowgrpo" in caplog.text


@pytest.mark.parametrize(
    ("argv", "fix"),
    [
        (["--atrain_algorithm", "ppo"], "valid values: flowgrpo, grpoguard, diffusionnft"),
        (["--clip_range_high", "-1"], "--clip_range_high .* must be a finite number > 0"),
        (["--atrain_algorithm", "diffusionnft", "--atrain_nft_adv_clip_range", "0"], "must be a finite number > 0"),
        (["--atrain_nft_decay_type", "3"], "valid values: 1, 2"),
        (["--atrain_nft_rollout", "dpm"], "valid values: ode, sde"),
    ],
)
def test_bad_algorithm_flags_say_how_to_fix(argv: list[str], fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        parse_args(argv, environ={})


def test_what_each_algorithm_changes_in_the_rollout_and_advantages() -> None:
    flow = TrainConfig()
    assert (flow.advantage_type, flow.rollout_eta, flow.shared_initial_noise, flow.scores_exact_logprob) == (
        "gdpo", 1.0, True, False
    )  # fmt: skip
    assert flow.algorithm_notices() == []
    guard = TrainConfig(atrain_algorithm="grpoguard")
    assert guard.scores_exact_logprob  # RatioNorm needs cps_sde's exact density
    assert guard.algorithm_notices() == [
        "grpoguard: cps_sde is scored with its exact Gaussian log-density (RatioNorm needs it)"
    ]
    nft = TrainConfig(atrain_algorithm="diffusionnft", atrain_kl_type="x-based")
    assert (nft.advantage_type, nft.rollout_eta, nft.shared_initial_noise) == ("grpo_global_std", 0.0, False)
    notes = nft.algorithm_notices()
    assert len(notes) == 3
    assert all(n.startswith("diffusionnft: ") for n in notes)
    assert "--atrain_adv_type gdpo is not used" in notes[0]
    assert "identical images" in notes[1]
    assert TrainConfig(atrain_algorithm="diffusionnft", atrain_nft_rollout="sde", sde_eta=0.7).rollout_eta == 0.7
    quiet = TrainConfig(atrain_algorithm="diffusionnft", atrain_adv_type="grpo_global_std", init_same_noise=False)
    assert quiet.algorithm_notices() == []
