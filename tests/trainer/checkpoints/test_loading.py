"""deepgen_trainer.checkpoints.loading: tiny HF folders → load_deepgen, checkpoint formats and key layouts, VLM LoRA."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from deepgen_trainer.checkpoints.formats import CheckpointReadError
from deepgen_trainer.checkpoints.loading import load_deepgen
from deepgen_trainer.model.deepgen import NEGATIVE_PROMPT, DeepGen
from deepgen_trainer.model.tiny import TINY_CHECKPOINT_NAME, build_tiny, save_tiny_pretrained, tiny_config

PROMPTS = ["a red cat", "a sign that says OPEN in bold letters"]
LORA_TARGETS = [
    "model.language_model.embed_tokens",
    "model.language_model.layers.1.self_attn.q_proj",
    "model.language_model.layers.2.mlp.down_proj",
]


@dataclass
class NotATensor:
    value: int


@pytest.fixture(scope="module")
def source() -> DeepGen:
    return build_tiny(seed=0)


@pytest.fixture(scope="module")
def folders(source: DeepGen, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    sd3, qwen = save_tiny_pretrained(root, source)
    return sd3, qwen, root / TINY_CHECKPOINT_NAME


def load(folders: tuple[Path, Path, Path], checkpoint: Path | None, **kwargs: object) -> tuple[DeepGen, object]:
    sd3, qwen, _ = folders
    return load_deepgen(sd3, qwen, checkpoint, dtype=torch.float32, config=tiny_config(), **kwargs)


def outputs(model: DeepGen) -> tuple[torch.Tensor, ...]:
    """Conditioning, guided velocity and decoded images of a fixed input."""
    x = torch.randn(2, *model.latent_shape(64, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond = model.encode_prompts(PROMPTS)
        v = model.velocity(x, 0.8, cond, cfg_scale=3.0, uncond=model.encode_prompts([NEGATIVE_PROMPT]))
        return cond.prompt_embeds, cond.pooled, v, model.decode(x)


def test_save_then_load_gives_identical_outputs(source: DeepGen, folders: tuple[Path, Path, Path]) -> None:
    model, report = load(folders, folders[2])
    assert report.unexpected == []
    assert report.missing_deepgen_only == []
    assert report.loaded == len(load_file(folders[2]))
    for got, want in zip(outputs(model), outputs(source), strict=True):
        assert_close(got, want, rtol=0, atol=0)
    assert all(name.startswith("transformer.") for name, p in model.named_parameters() if p.requires_grad)


def test_without_checkpoint_the_connector_is_untrained(folders: tuple[Path, Path, Path]) -> None:
    model, report = load(folders, None)
    assert report.checkpoint is None
    assert "no checkpoint" in report.summary()
    assert torch.count_nonzero(model.encode_prompts(PROMPTS).prompt_embeds) == 0  # SFT init: zero projectors


def test_wrapped_pth_keys_load(source: DeepGen, folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    state = {f"module.model.{k}": v for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "ckpt.pth")
    model, report = load(folders, tmp_path / "ckpt.pth")
    assert report.unexpected == []
    assert report.missing == []
    assert_close(model.meta_queries, source.meta_queries)


def test_unknown_keys_are_reported_as_unexpected(folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    save_file({"module.not_a_module.weight": torch.zeros(2), "connector.layers.9.mlp.fc1.weight": torch.zeros(2)},
              str(tmp_path / "ckpt.safetensors"))  # fmt: skip
    _, report = load(folders, tmp_path / "ckpt.safetensors")
    assert report.unexpected == ["connector.layers.9.mlp.fc1.weight", "not_a_module.weight"]
    assert report.loaded == 0
    assert "2 unexpected" in report.summary()
    assert report.missing_deepgen_only  # nothing of the connector was loaded


def test_old_qwen_key_layout_is_mapped(source: DeepGen, folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    # transformers < 5 saved the VLM as lmm.model.layers.* / lmm.visual.*; give those keys new values.
    old = {}
    for key, value in source.state_dict().items():
        if key.startswith("lmm.model.language_model."):
            old[key.replace("lmm.model.language_model.", "lmm.model.")] = value + 1.0
        elif key.startswith("lmm.model.visual."):
            old[key.replace("lmm.model.visual.", "lmm.visual.")] = value + 1.0
    torch.save(old, tmp_path / "old.pt")
    model, report = load(folders, tmp_path / "old.pt")
    assert report.unexpected == []
    assert report.loaded == len(old)
    embed = source.lmm.model.language_model.embed_tokens.weight
    assert_close(model.lmm.model.language_model.embed_tokens.weight, embed + 1.0)
    assert_close(model.lmm.model.visual.patch_embed.proj.weight, source.lmm.model.visual.patch_embed.proj.weight + 1.0)


def test_deepspeed_directory(source: DeepGen, folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    # The on-disk layout of a ZeRO-1/2 checkpoint (`latest` + tag/mp_rank_00_model_states.pt with the
    # full module under "module"), written here by hand: a real DeepSpeed engine is covered elsewhere.
    (tmp_path / "latest").write_text("global_step7\n")
    (tmp_path / "global_step7").mkdir()
    state = {"module": source.state_dict(), "global_steps": 7, "ds_version": "0.19.8", "optimizer": None}
    torch.save(state, tmp_path / "global_step7" / "mp_rank_00_model_states.pt")
    model, report = load(folders, tmp_path)
    assert report.missing == []
    assert report.unexpected == []
    assert_close(model.projector_1.weight, source.projector_1.weight)


def test_objects_of_unknown_classes_load_as_placeholders(
    source: DeepGen, folders: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    torch.save({"state_dict": source.state_dict(), "payload": NotATensor(1)}, tmp_path / "with_object.pth")
    model, report = load(folders, tmp_path / "with_object.pth")
    assert report.missing == []
    assert report.problems == []
    assert_close(model.projector_1.weight, source.projector_1.weight, rtol=0, atol=0)


def test_a_hostile_pickle_is_refused_and_never_runs(folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": torch.zeros(1), "payload": Hostile()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointReadError, match=r"evil\.pth: the pickle calls posix\.system\(\.\.\.\)"):
        load(folders, tmp_path / "evil.pth")
    assert not marker.exists()


def test_missing_paths_give_clear_errors(folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    qwen = folders[1]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_deepgen(tmp_path / "nowhere", qwen, dtype=torch.float32, config=tiny_config())
    (tmp_path / "sd3" / "transformer").mkdir(parents=True)
    (tmp_path / "sd3" / "scheduler").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing \['vae'\]"):
        load_deepgen(tmp_path / "sd3", qwen, dtype=torch.float32, config=tiny_config())
    with pytest.raises(FileNotFoundError, match=r"no_such\.pth"):
        load(folders, tmp_path / "no_such.pth")
    with pytest.raises(CheckpointReadError, match=r"holds none of: mp_rank_00_model_states\.pt.*\.safetensors"):
        load(folders, tmp_path / "sd3")


def test_shape_mismatch_is_an_error(folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    save_file({"meta_queries": torch.zeros(3, 5)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="meta_queries"):
        load(folders, tmp_path / "bad.safetensors")


def lora_source() -> DeepGen:
    """The tiny model with a rank-4 LoRA (random A and B, α = 8) on a few VLM modules."""
    model = build_tiny(seed=0)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS), model.lmm)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data.normal_(std=0.5)
    model.freeze()
    return model


@pytest.mark.parametrize("key_style", ["peft", "plain"])
def test_lora_checkpoint_is_injected_applied_and_frozen(
    key_style: str, source: DeepGen, folders: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    with_lora = lora_source()
    state = dict(with_lora.state_dict())
    if key_style == "plain":  # adapter name and base_layer stripped, as some exporters write them
        state = {
            k.replace(".base_layer.", ".").replace(".default.", ".").removesuffix(".default"): v
            for k, v in state.items()
        }
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "lora.safetensors"))

    model, report = load(folders, tmp_path / "lora.safetensors")
    assert report.lora_modules == sorted(LORA_TARGETS)
    assert report.lora_rank == 4
    assert report.lora_alpha == 8.0
    assert report.unexpected == []
    assert report.missing == []

    got, want, plain = outputs(model), outputs(with_lora), outputs(source)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)
    assert not torch.allclose(got[1], plain[1])  # the LoRA changes the conditioning
    lora_params = [p for name, p in model.named_parameters() if "lora_" in name]
    assert len(lora_params) == 2 * len(LORA_TARGETS)
    assert not any(p.requires_grad for p in lora_params)
    assert all(name.startswith("transformer.") for name, p in model.named_parameters() if p.requires_grad)
