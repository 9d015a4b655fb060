"""The original's evaluation options with their meaning: an eval YAML entry without ``scoring`` is
generated and kept only, ``--eval_inference_mode sde`` with its η and per-image seeds, the evaluation
size and batch, and the number of images uploaded to wandb and to swanlab."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepgen_trainer.config import parse_args
from deepgen_trainer.evaluation.evaluate import eval_items, generate_pngs
from deepgen_trainer.model.tiny import build_tiny
from deepgen_trainer.observe.tracking import Tracker
from deepgen_trainer.train import train
from tests.trainer.test_train import SMALL, train_yaml


def pixels(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data))).copy()).float()


def test_sde_images_do_not_depend_on_the_batch_and_differ_from_ode() -> None:
    model = build_tiny(seed=0).eval()
    items = eval_items([("0", "a red cube"), ("1", "two cats"), ("2", "a sign")], 2)
    kwargs = {"height": 32, "width": 32, "num_inference_steps": 4, "cfg_scale": 0.0}
    sde = ("cps_sde", 1.0)
    whole = [x for b in generate_pngs(model, items, batch_size=6, sde=sde, **kwargs) for x in b]
    ones = [x for b in generate_pngs(model, items, batch_size=1, sde=sde, **kwargs) for x in b]
    ode = [x for b in generate_pngs(model, items, batch_size=6, **kwargs) for x in b]
    for (_, a), (_, b), (_, o) in zip(whole, ones, ode, strict=True):
        assert pixels(a).shape == (32, 32, 3)
        assert (pixels(a) - pixels(b)).abs().max() <= 1  # per-image generators: batch-independent
        assert (pixels(a) - pixels(o)).abs().max() > 1  # the SDE noise changes the image
    no_noise = [x for b in generate_pngs(model, items, batch_size=6, sde=("cps_sde", 0.0), **kwargs) for x in b]
    for (_, a), (_, o) in zip(no_noise, ode, strict=True):  # η = 0: cps_sde is the Euler ODE
        assert (pixels(a) - pixels(o)).abs().max() <= 1


def test_unscored_entry_is_generated_and_kept_with_the_eval_options(tmp_path: Path) -> None:
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"thing {i}", "index": 10 + i}) + "\n" for i in range(3)))
    eval_yaml = tmp_path / "eval.yaml"
    eval_yaml.write_text(f"datasets:\n  - name: mine\n    path: {prompts}\n    duplicates: 2\n    cfg_scale: 0\n")
    out = tmp_path / "run"
    args = [*SMALL, "--dataset_config", str(train_yaml(tmp_path, "{clip_sim: 1.0}")), "--output_dir", str(out),
            "--max_steps", "1", "--eval_freq", "1", "--eval_dataset_config", str(eval_yaml),
            "--eval_inference_mode", "sde", "--eval_sde_eta", "0.5", "--eval_image_height", "32",
            "--eval_image_width", "48", "--eval_micro_batch_size", "4", "--eval_num_inference_steps", "3",
            "--eval_swanlab_num_upload_images", "3"]  # fmt: skip
    train(parse_args(args, environ={}))  # no UNIGENBENCH_API_URL: an unscored entry needs no service
    folder = out / "eval" / "mine" / "step-0000001"
    names = sorted(p.name for p in (folder / "images").iterdir())
    assert names == [f"{i}.{d}.png" for i in (10, 11, 12) for d in (0, 1)]
    with Image.open(folder / "images" / "10.0.png") as image:
        assert image.size == (48, 32)
    assert sorted(p.name for p in (folder / "uploads").iterdir()) == ["10.0.png", "10.1.png", "11.0.png"]
    assert (folder / "contact_sheet.png").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval/mine/images_generated"] == 6


def test_image_lists_go_to_one_backend_with_captions(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    images = []
    for i in range(2):
        Image.new("RGB", (20, 10), ("blue", "red")[i]).save(tmp_path / f"{i}.png")
        images.append((tmp_path / f"{i}.png", f"[{i}.0] prompt {i}"))
    with Tracker(["wandb"], output_dir=tmp_path / "out") as tracker:
        tracker.log_image_list("eval/mine", images, step=1, backend="wandb")
        tracker.log_image_list("eval/other", images, step=1, backend="swanlab")  # not this backend: nothing
    [run_dir] = (tmp_path / "out" / "wandb").glob("offline-run-*")
    assert len(list(run_dir.rglob("media/images/eval/mine_*.png"))) == 2
    assert not list(run_dir.rglob("media/images/eval/other_*.png"))
