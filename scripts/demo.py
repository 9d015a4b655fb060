"""The stack's main job on its embedded default: MR-GRPO training of the tiny DeepGen on CPU against a
real reward-ocr service, then conversion of the last checkpoint to an SFT-format state dict.

Usage: `make demo` (after `make setup`). Starts reward-ocr on free local ports, runs
`python -m deepgen_trainer.train --model tiny` for DEMO_STEPS steps (default 6) with clip_sim and the
OCR reward over gRPC, prints the per-step metrics, converts the last checkpoint with
`python -m deepgen_trainer.convert`, and stops the service with SIGTERM. Outputs: outputs/demo/, with
the reward curves in outputs/demo/reward.png; the last line is a one-line summary.

`make demo-learn` (`--learn`): the tiny model cannot learn OCR or clip_sim in a few CPU steps, so this
trains it for DEMO_STEPS steps (default 60) against a reward it can learn, the mean brightness of its
images, served by a real service through the reward contract (`python -m deepgen_trainer.demo_reward`,
over HTTP); the curve rises. Outputs: outputs/demo-learn/ (reward.png, metrics, checkpoints).
DEMO_OUTPUT_DIR overrides the output folder of either.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from deepgen_common.client import wait_ready
from deepgen_trainer.observe.reward_plot import plot_rewards

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "outputs" / "demo"
LEARN_OUTPUT = REPO / "outputs" / "demo-learn"
TRAIN_ARGS = [
    "--model", "tiny", "--dataset_config", str(REPO / "trainer" / "examples" / "demo.yaml"),
    "--rollout_n", "4", "--prompts_per_rank", "2", "--rollout_micro_batch_size", "4", "--atrain_micro_batch_size", "4",
    "--num_inference_steps", "8", "--image_height", "64", "--image_width", "64", "--learning_rate", "1e-4",
    "--warmup_steps", "0", "--save_steps", "3", "--deepspeed", "none", "--no-bf16", "--report_to", "none",
]  # fmt: skip
# The learnable demo: 2 prompts × 8 images, 8 SDE steps (4 trained), lr 1e-2 so that a minute of CPU shows a trend.
LEARN_ARGS = [
    "--model", "tiny", "--dataset_config", str(REPO / "trainer" / "examples" / "demo_learn.yaml"),
    "--rollout_n", "8", "--prompts_per_rank", "2", "--rollout_micro_batch_size", "8", "--atrain_micro_batch_size", "16",
    "--num_inference_steps", "8", "--timestep_fraction", "0.5", "--image_height", "64", "--image_width", "64",
    "--learning_rate", "1e-2", "--warmup_steps", "0", "--beta", "0", "--save_steps", "1000", "--deepspeed", "none",
    "--no-bf16", "--report_to", "none",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    learn = "--learn" in argv
    steps = os.environ.get("DEMO_STEPS", "60" if learn else "6")
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "HTTP_PORT": str(http_port), "GRPC_PORT": str(grpc_port)}
    env |= {"LOG_FORMAT": "text", "LOG_LEVEL": "WARNING"}
    name, module = ("demo-reward", "deepgen_trainer.demo_reward") if learn else ("reward-ocr", "reward_ocr")
    print(f"starting {name} (HTTP :{http_port}, gRPC :{grpc_port}) ...", flush=True)
    service = subprocess.Popen([sys.executable, "-m", module], env=env)
    summary = None
    try:
        try:
            wait_ready(f"http://127.0.0.1:{http_port}", alive=lambda: service.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            print(f"{name} did not become ready: {exc}", file=sys.stderr)
            return 1
        output = (
            Path(os.environ["DEMO_OUTPUT_DIR"])
            if os.environ.get("DEMO_OUTPUT_DIR")
            else LEARN_OUTPUT
            if learn
            else OUTPUT
        )
        shutil.rmtree(output, ignore_errors=True)
        args = [*(LEARN_ARGS if learn else TRAIN_ARGS), "--max_steps", steps, "--output_dir", str(output)]
        url = f"http://127.0.0.1:{http_port}" if learn else f"grpc://127.0.0.1:{grpc_port}"
        trainer_env = {**os.environ, "OCR_URL": url}
        what = "the mean brightness served by demo-reward over HTTP" if learn else "clip_sim + reward-ocr"
        print(f"training the tiny DeepGen for {steps} steps on CPU ({what}) ...", flush=True)
        if subprocess.run([sys.executable, "-m", "deepgen_trainer.train", *args], env=trainer_env).returncode:
            return 1
        print_metrics(output / "metrics.jsonl")
        if not learn:
            converted = output / "demo.pth"
            convert = [sys.executable, "-m", "deepgen_trainer.convert", str(output), "--output", str(converted)]
            if subprocess.run(convert).returncode:
                return 1
            print(f"\ncheckpoints and metrics in {output}; SFT-format state dict: {converted}")
        plot = output / "reward.png"
        curve = plot_rewards(output / "metrics.jsonl", plot, title="make demo-learn" if learn else "make demo")
        shown = plot.relative_to(REPO) if plot.is_relative_to(REPO) else plot
        summary = f"{'demo-learn' if learn else 'demo'}: {curve.line()}; plot {shown}"
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(30)
        print(f"{name} stopped (exit code {service.returncode})")
    print(summary)
    return 0


def print_metrics(path: Path) -> None:
    columns = [
        ("reward/total", "reward"), ("reward/clip_sim/mean", "clip_sim"), ("reward/ocr/mean", "ocr"),
        ("reward/ocr/na_rate", "ocr n/a"), ("policy/loss", "loss"), ("policy/clipfrac", "clipfrac"),
        ("grad_norm", "grad norm"), ("time/step", "step s"), ("time/reward", "reward wait s"),
    ]  # fmt: skip
    print("\n step " + "".join(f"{title:>14}" for _, title in columns))
    for line in path.read_text().splitlines():
        row = json.loads(line)
        cells = "".join(f"{_fmt(row.get(key)):>14}" for key, _ in columns)
        print(f"{row['step']:>5} {cells}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
