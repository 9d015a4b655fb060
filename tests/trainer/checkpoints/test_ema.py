"""EMA of the DiT: the update rule, the EMA DiT swapped in for evaluation, resume exactness through a
checkpoint, and `convert --ema` writing the average the checkpoint holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from deepgen_trainer.checkpoints.convert import convert
from deepgen_trainer.checkpoints.ema import DitEma, ema_dit
from deepgen_trainer.checkpoints.run_checkpoint import EMA_FILE, load_checkpoint
from deepgen_trainer.config import ConfigError, parse_args
from deepgen_trainer.model.deepgen import NEGATIVE_PROMPT
from deepgen_trainer.model.tiny import build_tiny
from deepgen_trainer.train import main, train
from tests.trainer.test_train import SMALL


def test_update_is_the_exponential_average_in_float32() -> None:
    # decay 0.5 from w = 0: towards 2 → 0.5·0 + 0.5·2 = 1, towards 2 again → 0.5·1 + 0.5·2 = 1.5,
    # towards 0 → 0.75. The state is bf16; the average stays float32 (1.5 and 0.75 are exact anyway).
    ema = DitEma({"w": torch.zeros(3, dtype=torch.bfloat16), "steps": torch.tensor(4)}, decay=0.5)
    assert set(ema.state_dict()) == {"w"}  # integer buffers are not averaged
    for target, expected in ((2.0, 1.0), (2.0, 1.5), (0.0, 0.75)):
        ema.update({"w": torch.full((3,), target, dtype=torch.bfloat16), "steps": torch.tensor(4)})
        assert ema.state_dict()["w"].dtype == torch.float32
        assert_close(ema.state_dict()["w"], torch.full((3,), expected))


def test_update_matches_a_naive_loop() -> None:
    torch.manual_seed(0)
    start, decay = torch.randn(5), 0.9
    targets = [torch.randn(5) for _ in range(4)]
    ema = DitEma({"w": start}, decay)
    naive = start.clone()
    for t in targets:
        ema.update({"w": t})
        naive = decay * naive + (1 - decay) * t
    assert_close(ema.state_dict()["w"], naive)


def test_bad_decay_and_mismatched_state_are_errors() -> None:
    with pytest.raises(ValueError, match=r"decay=1\.0 must be in \(0, 1\)"):
        DitEma({"w": torch.zeros(1)}, 1.0)
    ema = DitEma({"w": torch.zeros(1)}, 0.9)
    with pytest.raises(ValueError, match="1 unexpected and 1 missing"):
        ema.load_state_dict({"v": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"--eval_with_ema .* needs --ema_decay > 0"):
        parse_args(["--eval_with_ema"], environ={})
    with pytest.raises(ConfigError, match=r"--ema_decay must be in \[0, 1\)"):
        parse_args(["--ema_decay", "1"], environ={})


def test_ema_dit_runs_the_average_and_puts_the_training_dit_back() -> None:
    model = build_tiny(seed=0)
    shifted = {k: v + 0.05 for k, v in model.transformer.state_dict().items()}
    reference = build_tiny(seed=0)
    reference.transformer.load_state_dict(shifted)
    ema = DitEma(shifted, decay=0.9)
    x = torch.randn(2, *model.latent_shape(64, 64), generator=torch.Generator().manual_seed(1))
    cond, uncond = model.encode_prompts(["a red cat", "a dog"]), model.encode_prompts([NEGATIVE_PROMPT])
    live = model.transformer
    with torch.no_grad(), ema_dit(model, ema):
        assert model.transformer is not live
        got = model.velocity(x, 0.7, cond, cfg_scale=2.0, uncond=uncond)
    assert model.transformer is live
    with torch.no_grad():
        assert_close(got, reference.velocity(x, 0.7, cond, cfg_scale=2.0, uncond=uncond))


def write_prompts(tmp_path: Path) -> Path:
    (tmp_path / "prompts.txt").write_text("a red cat\na blue bicycle\na sign that says OPEN\na tree\n")
    yaml = tmp_path / "train.yaml"
    yaml.write_text(f"datasets:\n  - name: p\n    path: {tmp_path / 'prompts.txt'}\n    rewards: {{clip_sim: 1.0}}\n")
    return yaml


def test_resumed_ema_equals_the_unbroken_runs_and_convert_writes_it(tmp_path: Path) -> None:
    args = [*SMALL, "--dataset_config", str(write_prompts(tmp_path)), "--ema_decay", "0.8", "--save_steps", "1"]
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    train(parse_args([*args, "--output_dir", str(unbroken), "--max_steps", "3"], environ={}))
    train(parse_args([*args, "--output_dir", str(resumed), "--max_steps", "2"], environ={}))
    model = train(parse_args([*args, "--output_dir", str(resumed), "--max_steps", "3"], environ={}))

    a, b = load_checkpoint(unbroken / "checkpoint-3"), load_checkpoint(resumed / "checkpoint-3")
    assert_close(b.ema, a.ema, rtol=0, atol=0)
    assert_close(b.trainable, a.trainable, rtol=0, atol=0)
    # The average lags the weights: it is neither the initial nor the final DiT.
    initial = build_tiny(seed=42).transformer.state_dict()
    key = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(a.ema[key], a.trainable[key])
    assert not torch.equal(a.ema[key], initial[key])
    assert_close(a.trainable[key], model.transformer.state_dict()[key], rtol=0, atol=0)

    result = convert(resumed, tmp_path / "ema.pth", ema=True)
    state = torch.load(result.output, weights_only=True)
    ema_file = load_file(resumed / "checkpoint-3" / EMA_FILE)
    assert_close(
        {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}, ema_file
    )
    assert result.families["connector"] > 0


def test_a_resume_reads_the_checkpoint_onto_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Whole tensors onto every rank's GPU at once would add the DiT, its optimizer state and the fp32 EMA
    # to the peak; the resume reads onto the CPU and the restore copies each tensor into place.
    import deepgen_trainer.run as run_module

    seen = []

    def spy(path, map_location=None, **kwargs):
        ckpt = load_checkpoint(path, map_location=map_location, **kwargs)
        seen.append((map_location, {t.device.type for t in [*ckpt.trainable.values(), *ckpt.ema.values()]}))
        return ckpt

    args = [*SMALL, "--dataset_config", str(write_prompts(tmp_path)), "--ema_decay", "0.8", "--save_steps", "1"]
    train(parse_args([*args, "--output_dir", str(tmp_path / "run"), "--max_steps", "1"], environ={}))
    monkeypatch.setattr(run_module, "load_checkpoint", spy)
    train(parse_args([*args, "--output_dir", str(tmp_path / "run"), "--max_steps", "2"], environ={}))
    assert seen == [("cpu", {"cpu"})]


def test_an_ema_that_does_not_fit_the_dit_is_refused_naming_the_file_and_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    args = [*SMALL, "--dataset_config", str(write_prompts(tmp_path)), "--ema_decay", "0.8", "--output_dir", str(out)]
    train(parse_args([*args, "--max_steps", "1", "--save_steps", "1"], environ={}))
    file = out / "checkpoint-1" / EMA_FILE
    state = load_file(file)
    del state["transformer_blocks.0.attn.to_q.weight"]
    save_file(state, file)
    assert main([*args, "--max_steps", "2"]) == 2
    assert f"{file} does not hold an EMA of this DiT: EMA state does not match the DiT: 0 unexpected and 1 missing" in (
        caplog.text
    )
    assert "delete that file to resume with the EMA restarted at the resumed DiT" in caplog.text
    assert not (out / "checkpoint-2").exists()
