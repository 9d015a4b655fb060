"""SFT checkpoints in the original's formats, made by the original's tools: DeepSpeed folders saved through
a real engine (ZeRO-2 and ZeRO-3, an mmengine client state and an object of an unknown class), an
mmengine Runner file; each loads with nothing left at init and the LoRA's outputs equal the source's.
A folder whose ZeRO shards are gone (the LoRA lost) is refused with the fix, also by the trainer (exit 2)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from deepgen_trainer.checkpoints.formats import read_checkpoint
from deepgen_trainer.checkpoints.loading import (
    LORA_FAMILY,
    PartialCheckpointError,
    build_model,
    check_complete,
    load_deepgen,
)
from deepgen_trainer.config import ConfigError, parse_args
from deepgen_trainer.model.deepgen import NEGATIVE_PROMPT, DeepGen
from deepgen_trainer.model.tiny import build_tiny, save_tiny_pretrained, tiny_config
from deepgen_trainer.train import main
from tests.helpers import REPO
from tests.trainer.sft_checkpoints import TAG, xtuner_style_source

PROMPTS = ["a red cat", "a sign that says OPEN in bold letters"]


@pytest.fixture(scope="module")
def source() -> DeepGen:
    return xtuner_style_source()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """HF folders of the plain tiny model (no LoRA): what SD3_5_/QWEN2_5_VL_MODEL_NAME_OR_PATH point at."""
    return save_tiny_pretrained(tmp_path_factory.mktemp("hf"), build_tiny(seed=0))


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def deepspeed_work_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An mmengine work dir with `iter_5.pth/` written by a real DeepSpeed engine (own process: gloo)."""
    work_dir = tmp_path_factory.mktemp(f"zero{request.param}")
    done = subprocess.run(
        [sys.executable, "-m", "tests.trainer.sft_checkpoints", str(request.param), str(work_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work_dir


def load(folders: tuple[Path, Path], checkpoint: Path) -> tuple[DeepGen, object]:
    return load_deepgen(*folders, checkpoint, dtype=torch.float32, config=tiny_config())


def outputs(model: DeepGen) -> tuple[torch.Tensor, ...]:
    x = torch.randn(2, *model.latent_shape(64, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond = model.encode_prompts(PROMPTS)
        v = model.velocity(x, 0.8, cond, cfg_scale=3.0, uncond=model.encode_prompts([NEGATIVE_PROMPT]))
    return cond.prompt_embeds, cond.pooled, v


def assert_same_outputs(model: DeepGen, source: DeepGen) -> None:
    for got, want in zip(outputs(model), outputs(source), strict=True):
        assert_close(got, want, rtol=0, atol=0)


def test_deepspeed_folder_loads_whole(deepspeed_work_dir: Path, folders, source: DeepGen) -> None:
    contents = read_checkpoint(deepspeed_work_dir / TAG)
    stage = 2 if "zero2" in deepspeed_work_dir.name else 3
    assert contents.format == f"mmengine DeepSpeed ZeRO-{stage} folder"
    assert {"__main__.TrainingNote", "mmengine.logging.history_buffer.HistoryBuffer"} <= (contents.foreign)
    assert any(".lora_A." in k for k in contents.from_zero_shards)

    model, report = load(folders, deepspeed_work_dir / TAG)
    assert report.problems == []
    assert report.unexpected == []
    assert report.lora_rank == 4
    assert report.lora_alpha == 8.0
    assert {name: src.describe() for name, src in report.sources.items()} == dict.fromkeys(report.sources, "checkpoint")
    assert LORA_FAMILY in report.sources
    assert_same_outputs(model, source)


def test_mmengine_work_dir_resolves_last_checkpoint(deepspeed_work_dir: Path, folders, source: DeepGen) -> None:
    model, report = load(folders, deepspeed_work_dir)
    assert report.problems == []
    assert_same_outputs(model, source)


def test_module_entry_alone_loses_the_lora_and_is_refused(deepspeed_work_dir: Path, folders, tmp_path: Path) -> None:
    partial = tmp_path / TAG
    shutil.copytree(deepspeed_work_dir / TAG, partial, ignore=shutil.ignore_patterns("*optim_states.pt"))
    _, report = load(folders, partial)
    assert any("VLM LoRA" in p for p in report.problems)
    assert report.trained_not_loaded
    assert all(".lora_" in k for k in report.trained_not_loaded if k.startswith("lmm."))
    with pytest.raises(PartialCheckpointError, match=r"optim_states\.pt shards.*--allow_partial_checkpoint"):
        check_complete(report, allow_partial=False)
    check_complete(report, allow_partial=True)  # accepted knowingly: warnings only


def test_tiny_model_loads_the_checkpoint(deepspeed_work_dir: Path, source: DeepGen, tmp_path: Path) -> None:
    cfg = parse_args(["--model", "tiny", "--checkpoint", str(deepspeed_work_dir / TAG)], environ={})
    assert_same_outputs(build_model(cfg), source)

    partial = tmp_path / TAG
    shutil.copytree(deepspeed_work_dir / TAG, partial, ignore=shutil.ignore_patterns("*optim_states.pt"))
    with pytest.raises(ConfigError, match="--allow_partial_checkpoint"):
        build_model(parse_args(["--model", "tiny", "--checkpoint", str(partial)], environ={}))
    build_model(parse_args(["--model", "tiny", "--checkpoint", str(partial), "--allow_partial_checkpoint"], environ={}))


def test_the_trainer_exits_2_on_a_partial_checkpoint(deepspeed_work_dir: Path, tmp_path: Path, caplog) -> None:
    partial = tmp_path / TAG
    shutil.copytree(deepspeed_work_dir / TAG, partial, ignore=shutil.ignore_patterns("*optim_states.pt"))
    (tmp_path / "prompts.txt").write_text("a red cat\n")
    (tmp_path / "train.yaml").write_text(
        f"datasets:\n  - name: p\n    path: {tmp_path / 'prompts.txt'}\n    rewards: {{clip_sim: 1.0}}\n"
    )
    argv = ["--model", "tiny", "--checkpoint", str(partial), "--dataset_config", str(tmp_path / "train.yaml"),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--deepspeed", "none"]  # fmt: skip
    assert main(argv) == 2
    assert "VLM LoRA" in caplog.text
    assert "--allow_partial_checkpoint" in caplog.text


def test_mmengine_runner_file_loads_whole(folders, source: DeepGen, tmp_path: Path) -> None:
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

    hub = MessageHub.get_instance("runner-file")
    hub.update_scalar("train/loss", 0.5)
    optimizer = torch.optim.AdamW([p for p in source.parameters() if p.requires_grad], lr=1e-4)
    # The Runner's layout (mmengine Runner.save_checkpoint), with the transformers-4.51 VLM key names.
    state = OrderedDict(
        (k.replace("lmm.model.language_model.", "lmm.model.").replace("lmm.model.visual.", "lmm.visual."), v)
        for k, v in source.state_dict().items()
    )
    checkpoint = {
        "meta": {"epoch": 1, "iter": 100, "seed": 0, "experiment_name": "sft"},
        "state_dict": weights_to_cpu(state),
        "message_hub": hub.state_dict(),
        "optimizer": optimizer.state_dict(),
        "param_schedulers": [],
    }
    save_checkpoint(checkpoint, str(tmp_path / "iter_100.pth"))

    model, report = load(folders, tmp_path / "iter_100.pth")
    assert report.format == "mmengine Runner file"
    assert report.problems == []
    assert report.missing == []
    assert_same_outputs(model, source)
