"""The training loop end to end on CPU: the tiny DeepGen, clip_sim (tiny CLIP, in process) and the real
reward-ocr service; resume after a kill; `make convert`; two ranks under torchrun; bad configs."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from deepgen_trainer.checkpoints.run_checkpoint import latest_checkpoint, load_checkpoint
from deepgen_trainer.config import parse_args
from deepgen_trainer.model.tiny import TINY_IMAGE_SIZE, build_tiny
from deepgen_trainer.train import main, train
from tests.helpers import PROMPT_FIXTURES, REPO

PROMPTS = PROMPT_FIXTURES
SMALL = [
    "--model", "tiny", "--report_to", "none", "--no-bf16", "--deepspeed", "none",
    "--rollout_n", "2", "--prompts_per_rank", "2", "--rollout_micro_batch_size", "2",
    "--atrain_micro_batch_size", "2", "--num_inference_steps", "4", "--timestep_fraction", "0.5",
    "--image_height", str(TINY_IMAGE_SIZE), "--image_width", str(TINY_IMAGE_SIZE), "--learning_rate", "1e-3",
    "--warmup_steps", "0",
]  # fmt: skip


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def train_yaml(tmp_path: Path, rewards: str = "{clip_sim: 1.0, ocr: 1.0}") -> Path:
    return write_yaml(
        tmp_path / "train.yaml",
        "sampling_mode: sample_proportional\n"
        "datasets:\n"
        f"  - name: ocr\n    path: {PROMPTS / 'ocr.txt'}\n    sample_weight: 1.0\n"
        f"    rewards: {rewards}\n"
        f"  - name: general\n    path: {PROMPTS / 'general.txt'}\n    sample_weight: 1.0\n"
        "    rewards: {clip_sim: 1.0}\n",
    )


def sftaux_yaml(tmp_path: Path) -> Path:
    folder = tmp_path / "sft"
    folder.mkdir()
    lines = []
    for i, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        Image.new("RGB", (80, 64), colour).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a plain image, colour {i}"}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return write_yaml(
        tmp_path / "sftaux.yaml", f"resolution: {TINY_IMAGE_SIZE}\ndatasets:\n  - path: {folder / 'data.jsonl'}\n"
    )


def metrics(output_dir: Path) -> dict[int, dict]:
    """The last logged metrics of every step (a resumed run logs the steps after its checkpoint again)."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def test_three_steps_with_clip_sim_and_the_real_ocr_service(tmp_path: Path, ocr_service):
    out = tmp_path / "run"
    cfg = parse_args(
        [*SMALL, "--dataset_config", str(train_yaml(tmp_path)), "--sftaux_dataset_config", str(sftaux_yaml(tmp_path)),
         "--sftaux_coef", "0.1", "--ocr_url", ocr_service.grpc_url, "--output_dir", str(out), "--max_steps", "3",
         "--save_steps", "3", "--beta", "0.01"],
        environ={},
    )  # fmt: skip
    initial = build_tiny(seed=cfg.seed)
    model = train(cfg)

    logged = metrics(out)
    assert sorted(logged) == [1, 2, 3]
    for step, row in logged.items():
        for key in ("policy/loss", "policy/kl", "sft/loss", "grad_norm", "reward/clip_sim/mean"):
            assert math.isfinite(row[key]), (step, key, row[key])
        assert row["optim/steps"] == step  # exactly one optimizer step per rollout batch
        assert row["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    ocr_requested = [row["reward/ocr/fail_rate"] for row in logged.values() if "reward/ocr/fail_rate" in row]
    assert ocr_requested
    assert all(rate == 0.0 for rate in ocr_requested)

    trained, before = dict(model.named_parameters()), dict(initial.named_parameters())
    assert {n for n, p in trained.items() if p.requires_grad} == {
        n for n, p in before.items() if p.requires_grad
    }  # the DiT, less the last block's unused context queries (see DeepGen.freeze)
    for name, param in trained.items():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"

    checkpoint = load_checkpoint(latest_checkpoint(out))
    assert checkpoint.step == 3
    adam_steps = {int(s["step"]) for s in checkpoint.optimizer_state["state"].values()}
    assert adam_steps == {3}
    for name, tensor in checkpoint.trainable.items():
        torch.testing.assert_close(tensor, model.transformer.state_dict()[name], rtol=0, atol=0)


def test_step_per_backward_emulates_the_reference(tmp_path: Path):
    out = tmp_path / "run"
    argv = [*SMALL, "--dataset_config", str(train_yaml(tmp_path, "{clip_sim: 1.0}")), "--output_dir", str(out)]
    train(parse_args([*argv, "--max_steps", "1", "--step_per_backward"], environ={}))
    # 2 trained timesteps of 4 (fraction 0.5) × 2 micro-batches of the 4 images of a rank
    assert metrics(out)[1]["optim/steps"] == 4


def test_two_optimizer_steps_per_rollout_clip_from_the_second(tmp_path: Path):
    out = tmp_path / "run"
    argv = [*SMALL, "--dataset_config", str(train_yaml(tmp_path, "{clip_sim: 1.0}")), "--output_dir", str(out),
            "--sftaux_dataset_config", str(sftaux_yaml(tmp_path)), "--sftaux_coef", "0.1",
            "--max_steps", "2", "--optimizer_steps_per_rollout", "2"]  # fmt: skip
    train(parse_args(argv, environ={}))
    for step, row in metrics(out).items():
        assert row["optim/steps"] == 2 * step
        # The first optimizer step trains on the rollout's own policy: every ratio is exactly 1. The
        # second trains after an update, so ratios move past the 1e-4 clip range and clipping acts.
        assert row["policy/clipfrac/opt_step1"] == 0.0
        assert row["policy/clipfrac/opt_step2"] > 0.0
        assert math.isfinite(row["sft/loss"])


def run_trainer(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "deepgen_trainer.train", *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, **kwargs,
    )  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("extra", [[], ["--one_step_off_policy"]], ids=["sync", "one-step-off-policy"])
def test_killed_run_resumes_at_its_last_checkpoint_with_the_same_stream(tmp_path: Path, extra: list[str]):
    # With --one_step_off_policy the pipeline drains at save steps (--save_steps 3: steps 1-2 and 4-5
    # generate the next rollout ahead), so a resumed run regenerates the next batch exactly.
    yaml = train_yaml(tmp_path, "{clip_sim: 1.0}")
    args = [*SMALL, "--dataset_config", str(yaml), "--max_steps", "12", "--save_steps", "3", *extra]
    reference, resumed = tmp_path / "unbroken", tmp_path / "killed"

    unbroken = run_trainer([*args, "--output_dir", str(reference)])
    assert unbroken.wait(300) == 0, unbroken.stdout.read()

    victim = run_trainer([*args, "--output_dir", str(resumed)])
    deadline = time.monotonic() + 120
    while latest_checkpoint(resumed) is None or latest_checkpoint(resumed).name == "checkpoint-0":
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # no chance to clean up
    victim.wait(30)
    killed_at = load_checkpoint(latest_checkpoint(resumed)).step
    assert killed_at < 12

    restarted = run_trainer([*args, "--output_dir", str(resumed)])
    output = restarted.communicate(timeout=300)[0]
    assert restarted.returncode == 0, output
    assert f"at step {killed_at}" in output

    a, b = metrics(reference), metrics(resumed)
    for step in range(1, 13):
        assert b[step]["reward/total"] == pytest.approx(a[step]["reward/total"], abs=1e-6), step
        assert b[step]["policy/loss"] == pytest.approx(a[step]["policy/loss"], abs=1e-7), step
    if extra:  # generated one update before training on it, except right after a checkpoint
        assert [a[step]["policy/lag"] for step in range(1, 13)] == [0.0, 1.0, 1.0] * 4
    final_a = load_file(reference / "checkpoint-12" / "transformer.safetensors")
    final_b = load_file(resumed / "checkpoint-12" / "transformer.safetensors")
    for name in final_a:
        torch.testing.assert_close(final_b[name], final_a[name], rtol=0, atol=0)


@pytest.mark.integration
def test_make_convert_gives_a_state_dict_that_loads_into_a_fresh_model(tmp_path: Path):
    out = tmp_path / "run"
    cfg = parse_args(
        [*SMALL, "--dataset_config", str(train_yaml(tmp_path, "{clip_sim: 1.0}")), "--output_dir", str(out),
         "--max_steps", "1"],
        environ={},
    )  # fmt: skip
    model = train(cfg)
    target = tmp_path / "rl.pth"
    done = subprocess.run(
        ["make", "-s", "convert", f"CKPT={out}", f"OUT={target}"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    state = torch.load(target, weights_only=True)
    fresh = build_tiny(seed=cfg.seed)
    report = fresh.load_state_dict(state, strict=False)
    assert not [k for k in report.missing_keys if k.startswith("transformer.")]
    assert not report.unexpected_keys
    for name, tensor in model.transformer.state_dict().items():
        torch.testing.assert_close(fresh.transformer.state_dict()[name], tensor, rtol=0, atol=0)


def torchrun(args: list[str]) -> str:
    """Run the trainer on 2 CPU ranks (gloo); returns its output, failing the test on a non-zero exit."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(launcher), "--nproc_per_node", "2", "--master_port", str(port), "-m", "deepgen_trainer.train", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


@pytest.mark.integration
@pytest.mark.parametrize("deepspeed", ["zero2", "none"])
def test_torchrun_two_ranks_on_cpu_end_with_identical_weights(tmp_path: Path, deepspeed: str):
    out = tmp_path / "run"
    args = [*SMALL, "--dataset_config", str(train_yaml(tmp_path, "{clip_sim: 1.0}")), "--output_dir", str(out),
            "--max_steps", "2", "--deepspeed", deepspeed, "--log_component_grad_norm"]  # fmt: skip
    assert "all 2 ranks hold identical DiT weights" in torchrun(args)
    checkpoint = load_checkpoint(latest_checkpoint(out))
    assert (checkpoint.step, checkpoint.world_size) == (2, 2)
    rows = metrics(out)
    assert rows[2]["optim/steps"] == 2
    # While the policy is the reference (step 1) the β·KL part is zero and the policy part is the whole
    # gradient: its norm, averaged over the ranks, is the optimizer's.
    assert rows[1]["grad_norm/beta_kl"] == 0
    assert rows[1]["grad_norm/policy"] == pytest.approx(rows[1]["grad_norm"], rel=1e-5)


@pytest.mark.integration
def test_zero3_saves_whole_weights_and_resumes(tmp_path: Path):
    """ZeRO-3 with every parameter partitioned over the 2 ranks (no persistence threshold): the
    checkpoint holds the gathered weights (and the EMA of them), and a second run resumes from
    DeepSpeed's own state."""
    config = json.loads((REPO / "trainer" / "deepspeed" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    args = [*SMALL, "--dataset_config", str(train_yaml(tmp_path, "{clip_sim: 1.0}")), "--output_dir", str(out),
            "--deepspeed", str(tmp_path / "zero3.json"), "--ema_decay", "0.9"]  # fmt: skip
    torchrun([*args, "--max_steps", "1"])
    shapes = {k: v.shape for k, v in build_tiny().transformer.state_dict().items()}
    for name in ("transformer.safetensors", "ema.safetensors"):
        saved = load_file(out / "checkpoint-1" / name)
        assert {k: v.shape for k, v in saved.items()} == shapes, name
    assert "resumed from" in torchrun([*args, "--max_steps", "2"])
    assert metrics(out)[2]["optim/steps"] == 2
    assert load_checkpoint(out / "checkpoint-2").ema is not None


@pytest.mark.parametrize(
    ("yaml_text", "extra", "message"),
    [
        ("datasets:\n  - path: {prompts}\n    rewards: {{ocrr: 1.0}}\n", [], "valid reward names"),
        ("datasets:\n  - path: /nonexistent/prompts.txt\n    rewards: {{clip_sim: 1.0}}\n", [], "not found"),
        ("datasets:\n  - path: {prompts}\n    rewards: {{clip_sim: -1.0}}\n", [], "must be >= 0"),
        ("datasets:\n  - path: {prompts}\n    rewards: {{clip_sim: 1.0}}\n", ["--rollout_n", "1"], "--rollout_n >= 2"),
        ("datasets:\n  - path: {prompts}\n    rewards: {{clip_sim: 1.0}}\n", ["--atrain_micro_batch_size", "3"],
         "not a multiple of --atrain_micro_batch_size 3"),
        ("datasets:\n  - path: {prompts}\n    rewards: {{ocr: 1.0}}\n", [], "set OCR_URL"),
    ],
)  # fmt: skip
def test_bad_configs_fail_fast_with_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch, yaml_text: str, extra: list[str], message: str
):
    monkeypatch.setenv("OCR_URL", "")  # set but empty: no OCR service (unset means the original's localhost:18082)
    yaml = write_yaml(tmp_path / "train.yaml", yaml_text.format(prompts=PROMPTS / "geneval.txt"))
    out = tmp_path / "out"
    assert main([*SMALL, "--dataset_config", str(yaml), "--output_dir", str(out), "--max_steps", "1", *extra]) == 2
    assert message in caplog.text
    assert not (out / "metrics.jsonl").exists()  # failed before any step
