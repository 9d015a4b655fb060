"""deepgen_trainer.convert: SFT key names, merge onto an SFT checkpoint, dtype, atomic output, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

from deepgen_trainer import convert as convert_mod
from deepgen_trainer.checkpoint import CheckpointError, save_checkpoint
from deepgen_trainer.convert import MergeMismatch, MergeReport, convert, main
from tests.trainer.tiny_dit import tiny_dit


class TinyDeepGen(nn.Module):
    """The SFT model's layout: the DiT under ``.transformer`` next to the VLM, connector and VAE."""

    def __init__(self) -> None:
        super().__init__()
        self.lmm = nn.Linear(8, 8)
        self.connector = nn.Linear(8, 16)
        self.transformer = tiny_dit()
        self.vae = nn.Conv2d(3, 4, 1)


@pytest.fixture
def sft_model() -> TinyDeepGen:
    torch.manual_seed(0)
    return TinyDeepGen()


@pytest.fixture
def rl_run(tmp_path: Path, sft_model: TinyDeepGen) -> tuple[Path, dict[str, torch.Tensor]]:
    """An output dir with two checkpoints; the latest holds the SFT DiT plus an "RL update"."""
    torch.manual_seed(1)
    rl_dit = {k: v + 0.01 * torch.randn_like(v) for k, v in sft_model.transformer.state_dict().items()}
    out = tmp_path / "run"
    save_checkpoint(out, 10, trainable=sft_model.transformer.state_dict())
    save_checkpoint(out, 20, trainable=rl_dit)
    return out, rl_dit


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_converted_state_dict_loads_into_the_sft_model(rl_run, tmp_path: Path):
    out, rl_dit = rl_run
    result = convert(out, tmp_path / "rl.pth")  # an output dir: its latest checkpoint
    assert result.checkpoint == out / "checkpoint-20"
    assert result.report is None
    state = load_pth(tmp_path / "rl.pth")
    assert set(state) == {f"transformer.{k}" for k in rl_dit}

    model = TinyDeepGen()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == []
    assert not [k for k in missing if k.startswith("transformer.")]
    assert {k.split(".")[0] for k in missing} == {"lmm", "connector", "vae"}
    assert_close(model.transformer.state_dict(), rl_dit, rtol=0, atol=0)


def test_default_output_is_next_to_the_checkpoint(rl_run):
    out, _ = rl_run
    result = convert(out / "checkpoint-10")
    assert result.output == out / "checkpoint-10.pth"
    assert result.output.is_file()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-10", "checkpoint-10.pth", "checkpoint-20"]


@pytest.mark.parametrize("sft_format", ["pth", "wrapped_pth", "safetensors"])
def test_merge_onto_sft_replaces_the_dit_and_keeps_the_rest(rl_run, tmp_path: Path, sft_model, sft_format):
    out, rl_dit = rl_run
    sft = sft_model.state_dict()
    sft_path = tmp_path / f"sft.{'safetensors' if sft_format == 'safetensors' else 'pth'}"
    if sft_format == "safetensors":
        save_file({k: v.contiguous() for k, v in sft.items()}, sft_path)
    else:
        torch.save({"state_dict": sft} if sft_format == "wrapped_pth" else sft, sft_path)

    result = convert(out, tmp_path / "merged.pth", merge_onto_path=sft_path)
    n_dit = len(rl_dit)
    assert result.report == MergeReport(replaced=n_dit, added=0, untouched_dit=0, kept=len(sft) - n_dit)
    merged = load_pth(tmp_path / "merged.pth")
    assert set(merged) == set(sft)
    for k, v in merged.items():
        expected = rl_dit[k.removeprefix("transformer.")] if k.startswith("transformer.") else sft[k]
        assert_close(v, expected, rtol=0, atol=0, msg=k)

    model = TinyDeepGen()
    assert model.load_state_dict(merged, strict=True)  # self-contained: every key present


def test_merge_counts_added_and_untouched_dit_keys(rl_run, tmp_path: Path, sft_model):
    out, rl_dit = rl_run
    sft = sft_model.state_dict()
    del sft["transformer.proj_out.bias"]  # RL has it, SFT not → added
    sft["transformer.extra.weight"] = torch.zeros(2)  # SFT has it, RL not → untouched
    torch.save(sft, tmp_path / "sft.pth")
    result = convert(out, tmp_path / "merged.pth", merge_onto_path=tmp_path / "sft.pth")
    assert result.report == MergeReport(replaced=len(rl_dit) - 1, added=1, untouched_dit=1, kept=6)


def test_shape_mismatch_on_merge_is_a_clear_error(rl_run, tmp_path: Path, sft_model):
    out, _ = rl_run
    sft = sft_model.state_dict()
    sft["transformer.proj_out.weight"] = torch.zeros(5, 5)
    torch.save(sft, tmp_path / "sft.pth")
    expected = r"(?s)1 DiT tensors differ in shape from .*sft\.pth.*"
    expected += r"transformer\.proj_out\.weight: RL \(16, 16\) vs SFT \(5, 5\)"
    with pytest.raises(MergeMismatch, match=expected):
        convert(out, tmp_path / "merged.pth", merge_onto_path=tmp_path / "sft.pth")
    assert not (tmp_path / "merged.pth").exists()


def test_sft_file_needing_unpickling_is_refused(rl_run, tmp_path: Path):
    out, _ = rl_run
    torch.save({"meta": Path("x"), "w": torch.zeros(1)}, tmp_path / "sft.pth")
    with pytest.raises(CheckpointError, match=r"sft\.pth with torch\.load\(weights_only=True\)"):
        convert(out, tmp_path / "merged.pth", merge_onto_path=tmp_path / "sft.pth")


@pytest.mark.parametrize(
    ("name", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]
)
def test_dtype_casts_floating_tensors(rl_run, tmp_path: Path, sft_model, name, dtype):
    out, rl_dit = rl_run
    sft = sft_model.state_dict()
    sft["vae.num_batches_tracked"] = torch.tensor(3)  # an integer buffer stays an integer
    torch.save(sft, tmp_path / "sft.pth")
    convert(out, tmp_path / "merged.pth", merge_onto_path=tmp_path / "sft.pth", dtype=name)
    merged = load_pth(tmp_path / "merged.pth")
    assert merged["vae.num_batches_tracked"].dtype == torch.int64
    assert {v.dtype for k, v in merged.items() if k != "vae.num_batches_tracked"} == {dtype}
    k = "transformer_blocks.0.attn.to_q.weight"
    assert_close(merged[f"transformer.{k}"], rl_dit[k].to(dtype), rtol=0, atol=0)


def test_failed_write_leaves_the_old_output_and_no_temp_file(rl_run, tmp_path: Path, monkeypatch):
    out, _ = rl_run
    target = tmp_path / "rl.pth"
    target.write_bytes(b"previous")

    def failing_save(obj: object, f: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(convert_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert(out, target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rl.pth", "run"]


def test_missing_and_incomplete_checkpoints_name_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert(tmp_path / "nowhere")
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(CheckpointError, match=r"checkpoint-3 is incomplete"):
        convert(tmp_path / "checkpoint-3")
    with pytest.raises(CheckpointError, match=r"holds no complete checkpoint"):
        convert(tmp_path)


def test_main_returns_nonzero_on_a_bad_path(tmp_path: Path, caplog):
    assert main([str(tmp_path / "missing")]) == 1
    assert "missing does not exist" in caplog.text


@pytest.mark.integration
def test_cli(rl_run, tmp_path: Path, sft_model):
    out, rl_dit = rl_run
    torch.save(sft_model.state_dict(), tmp_path / "sft.pth")
    cmd = [sys.executable, "-m", "deepgen_trainer.convert", str(out), "--output", str(tmp_path / "o.pth")]
    proc = subprocess.run(
        [*cmd, "--merge-onto", str(tmp_path / "sft.pth"), "--dtype", "bf16"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert f"wrote {tmp_path / 'o.pth'}" in proc.stderr
    assert f"replaced {len(rl_dit)}, added 0" in proc.stderr
    merged = load_pth(tmp_path / "o.pth")
    assert merged["transformer.proj_out.weight"].dtype == torch.bfloat16

    proc = subprocess.run(
        [sys.executable, "-m", "deepgen_trainer.convert", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert "absent does not exist" in proc.stderr
