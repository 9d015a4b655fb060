"""deepgen_trainer.checkpoints.convert: the original converter's key families, --dit-only, --ema, merge onto an SFT
checkpoint in every format, dtype, atomic output, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

from deepgen_trainer.checkpoints import convert as convert_mod
from deepgen_trainer.checkpoints.convert import FAMILIES, MergeMismatch, MergeReport, convert, main
from deepgen_trainer.checkpoints.formats import CheckpointReadError
from deepgen_trainer.checkpoints.run_checkpoint import CheckpointError, save_checkpoint
from tests.trainer.tiny_dit import tiny_dit


class TinyDeepGen(nn.Module):
    """The SFT model's layout: the DiT under ``.transformer`` next to the VLM, think tokens, projectors,
    connector and VAE (what xtuner's model holds, at toy sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.lmm = nn.Linear(8, 8)
        self.meta_queries = nn.Parameter(torch.randn(4, 8))
        self.projector_1 = nn.Linear(8, 16)
        self.connector = nn.Linear(16, 16)
        self.projector_2 = nn.Linear(16, 16)
        self.projector_3 = nn.Linear(16, 16)
        self.transformer = tiny_dit()
        self.vae = nn.Conv2d(3, 4, 1)

    def deepgen_only(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in FAMILIES[1:]}


@pytest.fixture
def sft_model() -> TinyDeepGen:
    torch.manual_seed(0)
    return TinyDeepGen()


def rl_dit_of(sft_model: TinyDeepGen, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v + 0.01 * torch.randn_like(v) for k, v in sft_model.transformer.state_dict().items()}


@pytest.fixture
def rl_run(tmp_path: Path, sft_model: TinyDeepGen) -> tuple[Path, dict[str, torch.Tensor]]:
    """An output dir with two checkpoints; the latest holds the SFT DiT plus an "RL update", its EMA and
    the DeepGen-only weights the run used."""
    rl_dit = rl_dit_of(sft_model, 1)
    out = tmp_path / "run"
    frozen = sft_model.deepgen_only()
    save_checkpoint(out, 10, trainable=sft_model.transformer.state_dict(), deepgen_only=frozen)
    save_checkpoint(out, 20, trainable=rl_dit, deepgen_only=frozen, ema=rl_dit_of(sft_model, 2))
    return out, rl_dit


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_default_writes_every_family_of_the_original_converter(rl_run, tmp_path: Path, sft_model):
    out, rl_dit = rl_run
    result = convert(out, tmp_path / "rl.pth")  # an output dir: its latest checkpoint
    assert result.checkpoint == out / "checkpoint-20"
    assert result.report is None
    state = load_pth(tmp_path / "rl.pth")
    assert list(result.families) == list(FAMILIES)
    assert result.families["transformer"] == len(rl_dit)
    assert result.families["projector_1"] == 2
    assert result.families["meta_queries"] == 1

    model = TinyDeepGen()  # another init: every family the file holds must replace it
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == []
    assert {k.split(".")[0] for k in missing} == {"lmm", "vae"}  # what the original's converter omits too
    assert_close(model.transformer.state_dict(), rl_dit, rtol=0, atol=0)
    assert_close(model.deepgen_only(), sft_model.deepgen_only(), rtol=0, atol=0)


def test_dit_only_writes_transformer_keys_alone(rl_run, tmp_path: Path):
    out, rl_dit = rl_run
    result = convert(out, dit_only=True)
    assert result.output == out / "checkpoint-20.dit.pth"
    assert result.families == {"transformer": len(rl_dit)}
    assert set(load_pth(result.output)) == {f"transformer.{k}" for k in rl_dit}


def test_ema_writes_the_average_in_place_of_the_dit(rl_run, sft_model):
    out, _ = rl_run
    result = convert(out, ema=True)
    assert result.output == out / "checkpoint-20.ema.pth"
    state = load_pth(result.output)
    assert list(result.families) == list(FAMILIES)
    ema = rl_dit_of(sft_model, 2)
    assert_close({k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}, ema)
    with pytest.raises(CheckpointError, match="trained without --ema_decay"):
        convert(out / "checkpoint-10", ema=True)


def test_a_checkpoint_without_deepgen_only_weights_needs_a_choice(tmp_path: Path, sft_model):
    save_checkpoint(tmp_path / "old", 5, trainable=sft_model.transformer.state_dict())
    with pytest.raises(CheckpointError, match=r"lacks the key families \['connector'.*--merge-onto.*--dit-only"):
        convert(tmp_path / "old")
    assert convert(tmp_path / "old", dit_only=True).families == {"transformer": len(sft_model.transformer.state_dict())}


def test_default_output_is_next_to_the_checkpoint(rl_run):
    out, _ = rl_run
    result = convert(out / "checkpoint-10")
    assert result.output == out / "checkpoint-10.pth"
    assert result.output.is_file()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-10", "checkpoint-10.pth", "checkpoint-20"]


def write_sft(sft: dict[str, torch.Tensor], path: Path, sft_format: str) -> Path:
    """`sft` in the formats the SFT stage writes: flat, wrapped, safetensors, an mmengine Runner file
    (mmengine's own save_checkpoint, a real MessageHub) and a DeepSpeed-style folder."""
    if sft_format == "safetensors":
        path = path / "sft.safetensors"
        save_file({k: v.contiguous() for k, v in sft.items()}, path)
    elif sft_format == "mmengine":
        from mmengine.logging import MessageHub
        from mmengine.runner.checkpoint import save_checkpoint as mm_save

        hub = MessageHub.get_instance("convert-test")
        hub.update_scalar("train/loss", 0.25)
        path = path / "iter_100.pth"
        mm_save({"meta": {"iter": 100}, "state_dict": sft, "message_hub": hub.state_dict()}, str(path))
    elif sft_format == "deepspeed":
        path = path / "iter_100.pth"
        path.mkdir()
        torch.save({"module": sft, "buffer_names": [], "param_shapes": []}, path / "mp_rank_00_model_states.pt")
    else:
        path = path / "sft.pth"
        torch.save({"state_dict": sft} if sft_format == "wrapped_pth" else sft, path)
    return path


@pytest.mark.parametrize("sft_format", ["pth", "wrapped_pth", "safetensors", "mmengine", "deepspeed"])
def test_merge_onto_sft_replaces_the_families_and_keeps_the_rest(rl_run, tmp_path: Path, sft_model, sft_format):
    out, rl_dit = rl_run
    sft = sft_model.state_dict()
    sft_path = write_sft(sft, tmp_path, sft_format)

    result = convert(out, tmp_path / "merged.pth", merge_onto_path=sft_path)
    written = len(rl_dit) + len(sft_model.deepgen_only())
    assert result.report == MergeReport(replaced=written, added=0, untouched=0, kept=len(sft) - written)
    merged = load_pth(tmp_path / "merged.pth")
    assert set(merged) == set(sft)
    for k, v in merged.items():
        expected = rl_dit[k.removeprefix("transformer.")] if k.startswith("transformer.") else sft[k]
        assert_close(v, expected, rtol=0, atol=0, msg=k)

    model = TinyDeepGen()
    assert model.load_state_dict(merged, strict=True)  # self-contained: every key present


def test_merge_counts_added_and_untouched_keys(rl_run, tmp_path: Path, sft_model):
    out, rl_dit = rl_run
    sft = sft_model.state_dict()
    del sft["transformer.proj_out.bias"]  # RL has it, SFT not → added
    sft["transformer.extra.weight"] = torch.zeros(2)  # SFT has it, RL not → untouched
    torch.save(sft, tmp_path / "sft.pth")
    result = convert(out, tmp_path / "merged.pth", merge_onto_path=tmp_path / "sft.pth", dit_only=True)
    assert result.report == MergeReport(replaced=len(rl_dit) - 1, added=1, untouched=1, kept=len(sft) - len(rl_dit))


def test_shape_mismatch_on_merge_is_a_clear_error(rl_run, tmp_path: Path, sft_model):
    out, _ = rl_run
    sft = sft_model.state_dict()
    sft["transformer.proj_out.weight"] = torch.zeros(5, 5)
    torch.save(sft, tmp_path / "sft.pth")
    expected = r"(?s)1 tensors differ in shape from .*sft\.pth.*"
    expected += r"transformer\.proj_out\.weight: RL \(16, 16\) vs SFT \(5, 5\)"
    with pytest.raises(MergeMismatch, match=expected):
        convert(out, tmp_path / "merged.pth", merge_onto_path=tmp_path / "sft.pth")
    assert not (tmp_path / "merged.pth").exists()


def test_sft_file_with_a_hostile_pickle_is_refused(rl_run, tmp_path: Path):
    out, _ = rl_run
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(marker)],))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": Hostile()}, tmp_path / "sft.pth")
    with pytest.raises(CheckpointReadError, match=r"sft\.pth: the pickle calls subprocess\.call"):
        convert(out, tmp_path / "merged.pth", merge_onto_path=tmp_path / "sft.pth")
    assert not marker.exists()
    assert not (tmp_path / "merged.pth").exists()


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
    n_frozen = len(sft_model.deepgen_only())
    assert f"replaced {len(rl_dit) + n_frozen}, added 0" in proc.stderr
    assert (
        f"(transformer {len(rl_dit)}, connector 2, projector_1 2, projector_2 2, projector_3 2, meta_queries 1, "
        in (proc.stderr)
    )
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
