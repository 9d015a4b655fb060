"""The stack's main job on its embedded default: MR-GRPO training of the tiny DeepGen on CPU against a
real reward-ocr service, then conversion of the last checkpoint to an SFT-format state dict.

Usage: `make demo` (after `make setup`). Starts reward-ocr on free local ports, runs
`python -m deepgen_trainer.train --model tiny` for DEMO_STEPS steps (default 6) with clip_sim and the
OCR reward over gRPC, prints the per-step metrics, converts the last checkpoint with
`python -m deepgen_trainer.convert`, and stops the service with SIGTERM. Outputs: outputs/demo/.
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

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "outputs" / "demo"
TRAIN_ARGS = [
    "--model", "tiny", "--dataset_config", str(REPO / "trainer" / "examples" / "demo.yaml"),
    "--rollout_n", "4", "--prompts_per_rank", "2", "--rollout_micro_batch_size", "4", "--atrain_micro_batch_size", "4",
    "--num_inference_steps", "8", "--image_height", "64", "--image_width", "64", "--learning_rate", "1e-4",
    "--warmup_steps", "0", "--save_steps", "3", "--deepspeed", "none", "--no-bf16", "--report_to", "none",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    steps = os.environ.get("DEMO_STEPS", "6")
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "HTTP_PORT": str(http_port), "GRPC_PORT": str(grpc_port)}
    env |= {"LOG_FORMAT": "text", "LOG_LEVEL": "WARNING"}
    print(f"starting reward-ocr (HTTP :{http_port}, gRPC :{grpc_port}) ...", flush=True)
    service = subprocess.Popen([sys.executable, "-m", "reward_ocr"], env=env)
    try:
        try:
            wait_ready(f"http://127.0.0.1:{http_port}", alive=lambda: service.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            print(f"reward-ocr did not become ready: {exc}", file=sys.stderr)
            return 1
        shutil.rmtree(OUTPUT, ignore_errors=True)
        args = [*TRAIN_ARGS, "--max_steps", steps, "--output_dir", str(OUTPUT)]
        trainer_env = {**os.environ, "OCR_URL": f"grpc://127.0.0.1:{grpc_port}"}
        print(f"training the tiny DeepGen for {steps} steps on CPU (clip_sim + reward-ocr) ...", flush=True)
        if subprocess.run([sys.executable, "-m", "deepgen_trainer.train", *args], env=trainer_env).returncode:
            return 1
        print_metrics(OUTPUT / "metrics.jsonl")
        converted = OUTPUT / "demo.pth"
        convert = [sys.executable, "-m", "deepgen_trainer.convert", str(OUTPUT), "--output", str(converted)]
        if subprocess.run(convert).returncode:
            return 1
        print(f"\ncheckpoints and metrics in {OUTPUT}; SFT-format state dict: {converted}")
        return 0
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(30)
        print(f"reward-ocr stopped (exit code {service.returncode})")


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
    sys.exit(main())
